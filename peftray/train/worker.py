"""The Ray Train side of the loop: a `LoopContext` backed by `ray.train`, and the per-worker entry point.

Metrics go to `ray.train.report` on every rank (Ray keeps rank 0's) and to the job's single MLflow run
from rank 0 only; checkpoints are uploaded by Ray Train to the run's storage (S3).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from peftray.jobspec import JobSpec
from peftray.train import checkpoint
from peftray.train.loop import LoopContext, train


def worker_device(spec: JobSpec) -> torch.device:
    if spec.resources.use_tpu:
        import torch_xla.core.xla_model as xm

        return xm.xla_device()
    if spec.resources.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


class MlflowLogger:
    """Logs metrics dicts to one MLflow run, buffered: one request every `flush_s` seconds, and at once for
    evaluation metrics and at `flush()` (the end of training), so a fast step loop never waits on the server."""

    MAX_BATCH = 900  # MLflow takes at most 1000 metrics per log_batch

    def __init__(self, run_id: str | None, config=None, flush_s: float = 2.0) -> None:
        self.run_id = run_id
        self.client = None
        self.flush_s = flush_s
        self._buffer: list = []
        self._last = time.monotonic()
        if run_id:
            from peftray.registry.client import mlflow_client

            self.client = mlflow_client(config)

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        if (time.monotonic() - self._last >= self.flush_s or len(self._buffer) >= self.MAX_BATCH
                or any(k.startswith("eval_") for k in metrics)):
            self.flush()

    def artifact(self, path: Path, folder: str) -> None:
        """Upload one file into the run's artifacts under `folder` (no-op without a run)."""
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), folder)

    def flush(self) -> None:
        if self.client is not None and self._buffer:
            batch, self._buffer = self._buffer, []
            for i in range(0, len(batch), self.MAX_BATCH):
                self.client.log_batch(self.run_id, metrics=batch[i:i + self.MAX_BATCH], synchronous=True)
        self._last = time.monotonic()


def _report(metrics: dict[str, Any], folder: Path | None) -> None:
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
    name = checkpoint.folder_name(int(metrics.get("step", 0))) if folder else None
    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)  # uploaded synchronously; the local copy is not needed


def newest_stored_checkpoint(root: str, filesystem):
    """The highest-step complete checkpoint folder under `root` in storage, as a Ray `Checkpoint`, or None."""
    import pyarrow.fs as pafs
    import ray.train

    infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    folders = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                      and checkpoint.step_of(i.path) >= 0), key=checkpoint.step_of, reverse=True)
    for folder in folders:
        files = filesystem.get_file_info([f"{folder}/{name}" for name in checkpoint.FILES])
        if all(f.type == pafs.FileType.File for f in files):
            return ray.train.Checkpoint(folder, filesystem=filesystem)
    return None


@contextlib.contextmanager
def _latest_checkpoint(root: str | None, cfg):
    """The newer of Ray's latest checkpoint and the newest complete one in the run's storage folder.

    Ray Train learns of a reported checkpoint only when its controller next polls the workers; a worker that
    dies after the upload but before that poll leaves a checkpoint in storage that Ray does not know of, and
    resuming from Ray's alone would lose up to 2 x checkpoint_every steps.
    """
    import ray.train

    from peftray.train.checkpoint import storage_filesystem

    ckpt = ray.train.get_checkpoint()
    stored = newest_stored_checkpoint(root, storage_filesystem(cfg)) if root else None
    if stored is not None and (ckpt is None or checkpoint.step_of(stored.path) > checkpoint.step_of(ckpt.path)):
        ckpt = stored
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as folder:
        yield folder


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: `loop_config` = {spec, env, run_id, checkpoint_root}."""
    import ray.train

    from peftray.endpoints import load_config

    os.environ.update(loop_config.get("env") or {})
    spec = JobSpec.model_validate(loop_config["spec"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    cfg = load_config()
    ctx = LoopContext(
        rank=rank, world_size=context.get_world_size(), device=worker_device(spec),
        report=_report, resume_from=lambda: _latest_checkpoint(loop_config.get("checkpoint_root"), cfg),
        log=MlflowLogger(loop_config.get("run_id") if rank == 0 else None, cfg), config=cfg,
        workdir=Path(tempfile.gettempdir()),
    )
    ctx.artifact = ctx.log.artifact
    try:
        train(spec, ctx)
    finally:
        ctx.log.flush()  # the last steps' metrics, also when training fails part-way
