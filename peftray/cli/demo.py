"""`peftray demo`: train, register, promote and serve two adapters on the local stack."""

from __future__ import annotations

import argparse
from pathlib import Path

from peftray.endpoints import default_state_dir


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo-dir", default=".", help="folder holding jobs/ (default: the current folder)")
    p.add_argument("--model-dir", help="where the tiny base model lives (default: models/tiny-llama)")
    p.add_argument("--max-steps", type=int, help="override training.max_steps of the demo jobs")
    p.add_argument("--no-serve", action="store_true", help="stop after training and promotion")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from peftray.demo import DemoOptions, run

    repo = Path(args.repo_dir).absolute()
    if not (repo / "jobs" / "demo-polite.yaml").exists():
        print(f"error: {repo / 'jobs'} has no demo jobs; run `peftray demo` from the peftray checkout "
              "or pass --repo-dir")
        return 2
    state_dir = Path(args.state_dir).absolute() if args.state_dir else default_state_dir()
    opts = DemoOptions(state_dir=state_dir, repo_dir=repo, max_steps=args.max_steps, serve=not args.no_serve,
                       model_dir=Path(args.model_dir).absolute() if args.model_dir else None)
    run(opts)
    print("\npeftray demo finished.")
    return 0
