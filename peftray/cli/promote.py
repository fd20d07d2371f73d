"""`peftray promote NAME VERSION --alias A` through the control plane (implemented in `peftray.cli.jobs`)."""

from peftray.cli.jobs import register_promote as register

__all__ = ["register"]
