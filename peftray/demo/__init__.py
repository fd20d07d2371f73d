"""`peftray demo`: the whole product on the embedded local stack, through its public commands and APIs.

1. start the local stack (S3, MLflow, Ray head) and the control plane;
2. make the tiny base model if it is not there;
3. submit two LoRA jobs from jobs/ through the control plane's HTTP API and follow them with progress bars;
4. promote one adapter to `production` through a metric gate, and show a worse version refused by the gate;
5. deploy the serving app and ask both adapters and the base model the same questions (OpenAI API);
6. print where to look next.
A second run reuses the stack, the model and the registered versions (registration is idempotent per job).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from peftray.errors import PeftrayError

JOBS = ("demo-polite", "demo-counting")
TOTAL_STEPS = 6


class DemoError(PeftrayError):
    """A demo step failed; the message names the step."""

    code = "demo_failed"


@dataclass
class DemoOptions:
    state_dir: Path
    repo_dir: Path = field(default_factory=Path.cwd)  # where jobs/ lives
    model_dir: Path | None = None  # default: <repo_dir>/models/tiny-llama (what jobs/demo-*.yaml name)
    max_steps: int | None = None  # override training.max_steps (the end-to-end test trains less)
    serve: bool = True
    out: Callable[[str], None] = print


@dataclass
class DemoResult:
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # job name -> final job record
    promoted: dict[str, Any] | None = None
    refused: str | None = None
    answers: dict[str, list[str]] = field(default_factory=dict)  # model -> answers to steps.QUESTIONS
    plot: Path | None = None
    serve_url: str | None = None  # the demo app's route on the Serve proxy
    urls: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def _step(n: int, title: str, out: Callable[[str], None]) -> Iterator[None]:
    out(f"\n[{n}/{TOTAL_STEPS}] {title}")
    t0 = time.monotonic()
    try:
        yield
    except PeftrayError as exc:
        raise DemoError(f"step {n}/{TOTAL_STEPS} ({title}) failed: {exc}\n"
                        "The stack keeps running for a look at the logs; stop it with `peftray stack down`.") from exc
    out(f"      done in {time.monotonic() - t0:.0f}s")


def run(opts: DemoOptions) -> DemoResult:
    """Run the demo; raises DemoError naming the step that failed."""
    from peftray.demo import steps

    out, res = opts.out, DemoResult()
    with _step(1, "Start the local stack: object storage, MLflow, Ray head, control plane", out):
        cfg = steps.start_stack(opts)
    with _step(2, "Make the tiny Llama base model (once)", out):
        model_dir = steps.make_model(opts)
    with _step(3, f"Fine-tune two LoRA adapters through the control plane: {', '.join(JOBS)}", out):
        res.jobs = steps.train(opts, cfg, model_dir)
        res.plot = steps.plot(opts, cfg, res.jobs)
        if res.plot:
            out(f"      loss curves: {res.plot}")
    with _step(4, "Promote demo-polite to `production` through a metric gate; a worse version is refused", out):
        res.promoted, res.refused = steps.promote(opts, cfg, model_dir, res.jobs["demo-polite"])
    if opts.serve:
        with _step(5, "Serve both adapters and the base model from one deployment; ask them the same questions", out):
            res.answers, res.serve_url = steps.serve_and_ask(opts, cfg, model_dir)
    with _step(6, "Where to look next", out):
        res.urls = steps.where_next(opts, cfg, res.serve_url)
    return res
