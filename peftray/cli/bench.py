"""`peftray bench <area> [args]`: run `peftray.bench.<area>.main(args)` (each benchmark parses its own flags)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

from peftray.errors import ConfigError


def available() -> list[str]:
    """The benchmark areas: the modules of the peftray.bench package."""
    import peftray.bench

    return sorted(m.name for m in pkgutil.iter_modules(peftray.bench.__path__) if not m.name.startswith("_"))


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("area", help="which benchmark: tuners, train, registry, service, serve")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags (see `peftray bench AREA -h`)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    areas = available()
    if args.area not in areas:
        raise ConfigError(f"`peftray bench {args.area}`: no such benchmark; choose one of {areas}.")
    return int(importlib.import_module(f"peftray.bench.{args.area}").main(list(args.args)) or 0)
