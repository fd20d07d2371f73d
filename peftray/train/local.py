"""The training loop in this process, without Ray: one worker, plain PyTorch.

Used by the benchmark (Ray Train's overhead = Ray run / this run) and by tests that need the loop's
numbers without a cluster. Nothing is registered; checkpoints stay in a local folder when asked for.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftray.jobspec import JobSpec
from peftray.train.loop import LoopContext, build, train


@dataclass
class LocalRun:
    """Every step's metrics in order (what MLflow gets, with "step"), the final metrics, the last checkpoint."""

    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None


def run_local(spec: JobSpec, config=None, checkpoint_dir: Path | None = None) -> LocalRun:
    """Train `spec` in this process on CPU (or CUDA when `resources.use_gpu`), world size 1.

    Args:
        spec: the job spec (`resources.num_workers` is ignored: one process).
        config: `peftray.endpoints.Config` for s3:// sources.
        checkpoint_dir: keep checkpoints here (the latest one only); default: discard them.
    """
    run = LocalRun()
    keep = Path(checkpoint_dir) if checkpoint_dir else None

    def log(metrics: dict, step: int) -> None:
        if "loss" in metrics:
            run.history.append({**metrics, "step": float(step)})
        elif run.history and run.history[-1]["step"] == step:  # the final evaluation, logged on its own
            run.history[-1].update(metrics)

    def report(metrics: dict, folder: Path | None) -> None:
        if folder is None:
            return
        if keep is None:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        else:
            run.last_checkpoint = folder

    device = torch.device("cuda") if spec.resources.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    workdir = keep or Path(tempfile.mkdtemp(prefix="peftray-local-"))
    ctx = LoopContext(rank=0, world_size=1, device=device, report=report, log=log,
                      resume_from=lambda: contextlib.nullcontext(None), config=config, workdir=workdir)
    run.final = train(spec, ctx)
    return run


def build_local(spec: JobSpec, config=None):
    """The loop's `Job` (data, model, optimizer, ...) built in this process, for inspection in tests."""
    ctx = LoopContext(rank=0, world_size=1, device=torch.device("cpu"), report=lambda m, f: None,
                      resume_from=lambda: contextlib.nullcontext(None), config=config)
    return build(spec, ctx)
