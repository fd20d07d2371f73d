"""Ray driver (run as a subprocess by test_cluster_multinode.py): a 2-worker TorchTrainer with checkpoints in S3.

A low-rank adapter (A, B) on a frozen linear layer learns a known low-rank update under DDP. Every worker
records which node it ran on, per attempt, in S3; checkpoints (adapter weights + optimizer + step) go to S3
through Ray Train's storage_filesystem; at the end the adapter is logged to MLflow and registered.
Prints one JSON line with what the test checks.

    python driver_train.py NAME TOTAL_STEPS CHECKPOINT_EVERY STEP_SECONDS
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import ray
import torch
from ray import train
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from peftray.config import load_config


class LowRankAdapter(torch.nn.Module):
    def __init__(self, dim: int = 16, rank: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("base", torch.randn(dim, dim, generator=g))  # frozen
        self.lora_A = torch.nn.Parameter(torch.randn(rank, dim, generator=g) * 0.1)
        self.lora_B = torch.nn.Parameter(torch.zeros(dim, rank))

    def forward(self, x):
        return x @ (self.base + self.lora_B @ self.lora_A).T


def train_loop(cfg: dict) -> None:
    import s3fs
    from safetensors.torch import load_file, save_file

    ctx = train.get_context()
    rank, node_id = ctx.get_world_rank(), ray.get_runtime_context().get_node_id()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **cfg["storage_options"])
    model = LowRankAdapter()
    opt = torch.optim.Adam([model.lora_A, model.lora_B], lr=0.05)
    start = 0
    ckpt = train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "adapter.safetensors")), strict=False)
            state = torch.load(os.path.join(d, "trainer_state.pt"))
            opt.load_state_dict(state["optimizer"])
            start = state["step"] + 1
    # One file per worker process: which node it ran on and from which step it started.
    fs.pipe(f"{cfg['prefix']}/placements/start{start:04d}-rank{rank}-pid{os.getpid()}", node_id.encode())
    ddp = train.torch.prepare_model(model)
    g = torch.Generator().manual_seed(1234 + rank)
    target = torch.randn(16, 2, generator=torch.Generator().manual_seed(7)) @ torch.randn(
        2, 16, generator=torch.Generator().manual_seed(8))
    for step in range(start, cfg["total_steps"]):
        x = torch.randn(32, 16, generator=g)
        loss = torch.nn.functional.mse_loss(ddp(x), x @ (model.base + target).T)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(cfg["step_seconds"])
        metrics = {"step": step, "loss": loss.item(), "resumed_from": start}
        if (step + 1) % cfg["checkpoint_every"] == 0 or step + 1 == cfg["total_steps"]:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    save_file({"lora_A": model.lora_A.detach(), "lora_B": model.lora_B.detach()},
                              os.path.join(d, "adapter.safetensors"))
                    torch.save({"optimizer": opt.state_dict(), "step": step}, os.path.join(d, "trainer_state.pt"))
                train.report(metrics, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
        else:
            train.report(metrics)


def register(result, name: str) -> dict:
    """Log the final checkpoint's adapter to an MLflow run and register it as a model version."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_experiment(f"cluster-tests-{name}")
    with mlflow.start_run(run_name=name) as run, result.checkpoint.as_directory() as d:
        mlflow.log_metrics({"loss": result.metrics["loss"], "step": result.metrics["step"]})
        mlflow.log_artifact(os.path.join(d, "adapter.safetensors"), artifact_path="adapter")
        client = MlflowClient()
        client.create_registered_model(name)
        mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    return {"model_name": name, "version": mv.version, "run_id": run.info.run_id}


def main() -> None:
    name, total, every, step_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    cfg = load_config()
    import pyarrow.fs

    fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(cfg.s3fs()))
    prefix = f"{cfg.bucket}/cluster-tests/{name}"
    ray.init(address=cfg.ray_address, log_to_driver=False)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"storage_options": cfg.storage_options(), "prefix": prefix, "total_steps": total,
                           "checkpoint_every": every, "step_seconds": step_s},
        # SPREAD, not STRICT_SPREAD: the two workers land on different nodes while both nodes live, and
        # after one dies the restarted group may still be placed on the node that is left.
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}, placement_strategy="SPREAD"),
        run_config=RunConfig(name=name, storage_path=f"{prefix}/ray", storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=3)),
    )
    result = trainer.fit()
    out = {"metrics": result.metrics, "checkpoint": result.checkpoint.path, "error": repr(result.error),
           **register(result, name)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
