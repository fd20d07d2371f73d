"""`peftray bench train`: what Ray Train costs and what a second worker buys, on the same loop.

Same steps, same model (the tiny Llama), same data (jobs/data/tiny_instruct.jsonl):
1. baseline: the loop in plain PyTorch in this process (`peftray.train.local.run_local`, one thread, like a
   1-CPU Ray worker);
2. Ray Train, 1 worker: wall time of `TorchTrainer.fit()` (workers start, load, train, checkpoint to S3);
   reported as the wall ratio and the fixed start-up seconds (Ray wall - baseline wall);
3. Ray Train, 2 workers (per-worker batch unchanged): tokens/s over the training steps, / the 1-worker one.

Uses the running local stack (`peftray stack up`), or starts a temporary one. Writes bench-results/train.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from peftray.tables import table

JOBS = Path(__file__).resolve().parents[2] / "jobs"  # the repository's example specs and data


def _spec(model: Path, steps: int, batch: int, workers: int, seq: int):
    from peftray.jobspec import load_spec

    return load_spec(JOBS / "tiny-lora-instruct.yaml", [
        f"base_model.path={model}", f"dataset.source={JOBS / 'data' / 'tiny_instruct.jsonl'}", f"name=bench-{uuid.uuid4().hex[:8]}", f"training.max_steps={steps}",
        f"training.batch_size={batch}", f"resources.num_workers={workers}", f"dataset.max_seq_len={seq}",
        "training.eval_every=null", f"training.checkpoint_every={steps}", "dataset.eval_fraction=0.1"])


def _baseline(spec) -> dict[str, Any]:
    import torch

    from peftray.train.local import run_local

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a Ray worker with 1 CPU runs torch on one thread
    try:
        t0 = time.perf_counter()
        run = run_local(spec)
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"wall_s": wall, "train_seconds": run.final["train_seconds"],
            "tokens_per_s": run.final["train_tokens_per_s"]}


def _ray(spec, cfg) -> dict[str, Any]:
    from peftray.train.run import connect_ray, make_trainer

    connect_ray(cfg)
    t0 = time.perf_counter()
    result = make_trainer(spec, cfg, run_id=None, storage=f"{cfg.bucket}/bench-train").fit()
    wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"bench job failed: {result.error}")
    m = result.metrics
    return {"wall_s": wall, "train_seconds": m["train_seconds"], "tokens_per_s": m["train_tokens_per_s"]}


def run(cfg, steps: int, batch: int, seq: int, workdir: Path) -> dict[str, Any]:
    from peftray.base_models import make_tiny_llama

    model = make_tiny_llama(workdir / "tiny-llama")
    base = _baseline(_spec(model, steps, batch, 1, seq))
    one = _ray(_spec(model, steps, batch, 1, seq), cfg)
    two = _ray(_spec(model, steps, batch, 2, seq), cfg)
    return {
        "setup": {"model": "tiny-llama (hidden 64, 2 layers)", "steps": steps, "batch_per_worker": batch,
                  "max_seq_len": seq, "device": "cpu"},
        "plain_pytorch_1proc": base, "ray_train_1_worker": one, "ray_train_2_workers": two,
        "ray1_over_plain_wall": one["wall_s"] / base["wall_s"],
        "ray_fixed_startup_s": one["wall_s"] - base["wall_s"],
        "ray1_over_plain_step_time": one["train_seconds"] / base["train_seconds"],
        "tokens_per_s_2_over_1_workers": two["tokens_per_s"] / one["tokens_per_s"],
    }


def _print(r: dict[str, Any]) -> None:
    rows = [[name, f"{r[key]['wall_s']:.1f}", f"{r[key]['train_seconds']:.2f}", f"{r[key]['tokens_per_s']:.0f}"]
            for name, key in (("plain PyTorch, 1 process", "plain_pytorch_1proc"),
                              ("Ray Train, 1 worker", "ray_train_1_worker"),
                              ("Ray Train, 2 workers", "ray_train_2_workers"))]
    print(table(["run", "wall s", "train-loop s", "tokens/s"], rows))
    print(f"\nRay 1 worker / plain wall = {r['ray1_over_plain_wall']:.2f}x   fixed start-up = "
          f"{r['ray_fixed_startup_s']:.1f} s   step time ratio = {r['ray1_over_plain_step_time']:.2f}x   "
          f"tokens/s 2 workers / 1 worker = {r['tokens_per_s_2_over_1_workers']:.2f}x")


def _dpo(args) -> int:
    from peftray.base_models import make_tiny_llama
    from peftray.bench import _train_preference as pref

    with tempfile.TemporaryDirectory(prefix="peftray-bench-dpo-") as tmp:
        model = make_tiny_llama(Path(tmp) / "tiny-llama")
        result = pref.run(model, Path(tmp), args.steps, args.batch_size, args.max_seq_len, args.reps)
        result["peak_memory"] = pref.peak_memory(model, Path(tmp), args.steps, args.batch_size, args.max_seq_len)
    pref.report(result)
    out = Path(args.out if args.out != "bench-results/train.json" else "bench-results/train-dpo.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftray bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per worker per step")
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--out", default="bench-results/train.json")
    parser.add_argument("--objective", choices=["sft", "dpo"], default="sft",
                        help="dpo: peftray's DPO step against TRL's DPOTrainer step (no stack needed)")
    parser.add_argument("--reps", type=int, default=5, help="dpo: alternating repetitions of the arms")
    args = parser.parse_args(argv)
    if args.objective == "dpo":
        return _dpo(args)
    from peftray.bench.common import local_stack

    with local_stack("peftray-bench-train-") as cfg, tempfile.TemporaryDirectory(prefix="peftray-bench-train-") as tmp:
        result = run(cfg, args.steps, args.batch_size, args.max_seq_len, Path(tmp))
    _print(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")
    return 0
