"""Benchmarks, one module per area, each run as `peftray bench <area>` against its baseline."""
