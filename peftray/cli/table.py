"""Plain-text tables for CLI output (the implementation lives in `peftray.tables`, usable outside the CLI)."""

from peftray.tables import table

__all__ = ["table"]
