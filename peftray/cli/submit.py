"""`peftray submit SPEC [key=value ...] [--follow | --no-wait]` (implemented in `peftray.cli.jobs`)."""

from peftray.cli.jobs import register_submit as register

__all__ = ["register"]
