"""`peftray ...`: the command line. Thin: parse, call the library, print.

Each command group lives in its own small module here and registers its subcommands; modules are
imported only when their group runs, so `peftray --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from peftray.errors import PeftrayError

# command group -> (module under peftray.cli, one-line help)
GROUPS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the whole product on the local stack: train, register, promote and serve two adapters"),
    "bench": ("bench", "run a benchmark against its baseline (tuners, train, registry, service, serve)"),
    "stack": ("stack", "start, check and stop the embedded local stack (S3, MLflow, Ray)"),
    "train": ("train", "train a job spec (YAML) on Ray Train and register the adapter: peftray train job.yaml [k=v ...]"),
    "make-tiny-model": ("tiny_model", "write the tiny Llama-architecture model (and tokenizer) used by tests and the demo"),
    "registry": ("registry", "list, show, import, promote, roll back, diff and fetch registered adapters"),
    "service": ("service", "start, check and stop the control plane (REST API) on the local stack; issue tokens"),
    "submit": ("submit", "submit a job spec to the control plane and follow it (like `ray job submit`)"),
    "jobs": ("jobs", "list, show, follow (logs, events) and cancel jobs of the control plane"),
    "promote": ("promote", "point an adapter alias at a version through the control plane"),
    "serve": ("serve", "deploy, check and remove multi-adapter OpenAI-compatible serving on Ray Serve"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftray", description="Parameter-efficient fine-tuning jobs on Ray.")
    parser.add_argument("--state-dir", help="local stack state folder (default: $PEFTRAY_STATE_DIR or ./.peftray)")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND")
    for name, (module, help_text) in GROUPS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:  # import only the group that runs: `peftray --help` stays fast
            importlib.import_module(f"peftray.cli.{module}").register(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--state-dir")
    rest = pre.parse_known_args(argv)[1]
    group = rest[0] if rest and not rest[0].startswith("-") else None
    parser = build_parser(only=group if group in GROUPS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.state_dir:  # every command (and what it starts) finds the same stack
        os.environ["PEFTRAY_STATE_DIR"] = str(Path(args.state_dir).absolute())
    try:
        return int(args.func(args) or 0)
    except PeftrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
