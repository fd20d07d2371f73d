"""One job's training in this process (a warm runner's), without Ray Train: the same loop, the same checkpoints.

Ray Train costs a one-worker job seconds before its first step (a controller process, a worker process, its
train context). A warm runner (`peftray.train.warm`) has torch and peftray imported already and trains a
one-worker CPU job here. What a job gets is unchanged:

- checkpoints are uploaded to the run's folder in storage as Ray Train lays them out
  (`<bucket>/train/<owner>/<name>-<fingerprint>/checkpoint_<step>`, the newest two kept), so either runner
  resumes the other's checkpoints (`peftray.train.worker.newest_stored_checkpoint`);
- a failure that is not the job's input (`ConfigError`) or a non-finite loss is retried from the newest stored
  checkpoint up to `training.max_failures` times, as Ray Train's FailureConfig does;
- the result has the shape `run_job` registers from: final metrics, the final checkpoint, the error.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from peftray.errors import ConfigError, NonFiniteError, PeftrayError
from peftray.jobspec import JobSpec
from peftray.train import checkpoint
from peftray.train.loop import LoopContext, train

KEEP = 2  # stored checkpoints kept per run, as Ray Train's CheckpointConfig(num_to_keep=2)


class Cancelled(PeftrayError, RuntimeError):
    """The job was cancelled while it trained (checked after every step)."""

    code = "cancelled"


@dataclass
class LocalCheckpoint:
    """The final checkpoint's local folder, with Ray's `Checkpoint.as_directory()` interface."""

    path: Path

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.path)


@dataclass
class InProcessResult:
    """What `run_job` reads of a fit: the last report's metrics, the final checkpoint, the error."""

    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: LocalCheckpoint | None = None
    error: BaseException | None = None
    workdir: Path | None = None  # this fit's local folder (the final checkpoint is in it): the caller removes it


def _upload(folder: Path, dest: str, fs) -> None:
    """Copy a checkpoint folder to `dest` in storage, its trainer state last: a stored folder holding every file
    of `checkpoint.FILES` was uploaded whole (`newest_stored_checkpoint` skips incomplete ones)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    last = {folder / checkpoint.STATE_FILE}
    for path in [p for p in files if p not in last] + [p for p in files if p in last]:
        with fs.open_output_stream(f"{dest}/{path.relative_to(folder).as_posix()}") as out:
            out.write(path.read_bytes())


def _prune(root: str, fs) -> None:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    folders = sorted((i.path for i in infos if i.type == pafs.FileType.Directory and checkpoint.step_of(i.path) >= 0),
                     key=checkpoint.step_of, reverse=True)
    for old in folders[KEEP:]:
        try:
            fs.delete_dir(old)
        except FileNotFoundError:  # gone already (a listing can show a folder whose files were just deleted)
            pass


@contextlib.contextmanager
def _newest_stored(root: str, fs):
    """The newest complete checkpoint in the run's storage folder, downloaded into a local folder; or None."""
    from peftray.train.worker import newest_stored_checkpoint

    found = newest_stored_checkpoint(root, fs)
    if found is None:
        yield None
        return
    with found.as_directory() as folder:  # Ray's Checkpoint downloads it and removes the copy afterwards
        yield folder


def fit_in_process(spec: JobSpec, cfg, run_id: str | None, root: str,
                   should_stop: Callable[[], bool] = lambda: False) -> InProcessResult:
    """Train `spec` (one worker, CPU) here; checkpoints go to `root` in storage (a pyarrow path, no `s3://`).

    The result holds the final checkpoint's local folder: the caller registers it, then removes
    `result.workdir`."""
    from peftray.train.checkpoint import storage_filesystem
    from peftray.train.worker import MlflowLogger

    fs = storage_filesystem(cfg)
    workdir = Path(tempfile.mkdtemp(prefix="peftray-job-"))
    logger = MlflowLogger(run_id, cfg)
    state: dict[str, Any] = {"folder": None, "metrics": {}}

    def report(metrics: dict, folder: Path | None) -> None:
        state["metrics"] = metrics
        if folder is None:
            return
        _upload(folder, f"{root}/{checkpoint.folder_name(int(metrics.get('step', 0)))}", fs)
        _prune(root, fs)
        if state["folder"] is not None:
            shutil.rmtree(state["folder"], ignore_errors=True)
        state["folder"] = folder

    def log(metrics: dict, step: int) -> None:
        logger(metrics, step)
        if should_stop():
            raise Cancelled(f"job {spec.name} was cancelled after step {step}")

    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    failures = 0
    while True:
        ctx = LoopContext(rank=0, world_size=1, device=torch.device("cpu"), report=report,
                          resume_from=lambda: _newest_stored(root, fs), log=log, config=cfg,
                          workdir=workdir)
        ctx.artifact = logger.artifact
        try:
            train(spec, ctx)
            break
        except (ConfigError, NonFiniteError, Cancelled):
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        except Exception as exc:  # noqa: BLE001 - retried as Ray Train retries a failed worker
            failures += 1
            traceback.print_exc()
            if failures > spec.training.max_failures:
                return InProcessResult(error=exc, workdir=workdir)
            print(f"peftray: attempt {failures} of job {spec.name} failed ({type(exc).__name__}: {exc}); "
                  "resuming from its newest stored checkpoint", flush=True)
        finally:
            logger.flush()
    folder = state["folder"]
    return InProcessResult(metrics=state["metrics"], checkpoint=LocalCheckpoint(Path(folder)) if folder else None,
                           workdir=workdir)
