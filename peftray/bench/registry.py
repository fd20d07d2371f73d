"""`peftray bench registry`: adapter fetch and register/promote latency on the local stack, beside a baseline.

1. Fetch of a ~10 MB adapter: cold (empty cache: resolve nothing, list + ranged parallel GETs with s3fs, sha256
   of every file, into the content-addressed cache), cold by reference (`name@alias`, plus the MLflow lookup),
   and cached (sha256 re-verified, no network), against a plain boto3 `get_object` of the same bytes from the
   same bucket in the same run (a warm client: the fastest way to read them).
2. Register (validate, hash, upload through the MLflow server, create the version) and promote (gate-free,
   CAS audit append + alias sync) latency.

Uses the running local stack (`peftray stack up`), or starts a temporary one. Writes bench-results/registry.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from peftray.bench.common import local_stack
from peftray.tables import table
from peftray.endpoints import Config


def write_adapter(path: Path, size_mb: float) -> Path:
    """A LoRA adapter folder (HF-PEFT layout) of about `size_mb` MB of float32 weights."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    hidden, rank = 1024, 16
    per_layer = 2 * 2 * rank * hidden * 4  # q and v, A and B, float32
    tensors = {}
    for layer in range(max(1, int(size_mb * 2**20 / per_layer))):
        for proj in ("q_proj", "v_proj"):
            pre = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{pre}.lora_A.weight"] = rng.standard_normal((rank, hidden), dtype=np.float32)
            tensors[f"{pre}.lora_B.weight"] = rng.standard_normal((hidden, rank), dtype=np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "bench-base"}, indent=2))
    return path


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "n": len(xs)}


def run(cfg: Config, tmp: Path, size_mb: float, repeats: int) -> dict[str, Any]:
    from peftray import registry as R
    from peftray.registry.client import boto3_s3

    folder = write_adapter(tmp / "adapter", size_mb)
    nbytes = sum(p.stat().st_size for p in folder.iterdir())
    name = f"bench-registry-{uuid.uuid4().hex[:8]}"
    R.register_adapter(folder, name, job_name="warmup", config=cfg)  # first call pays imports and experiment setup
    reg, pro, versions = [], [], []
    for i in range(repeats):
        reg.append(_timed(lambda: versions.append(R.register_adapter(folder, name, job_name=f"job-{i}", config=cfg))))
        pro.append(_timed(lambda: R.promote(name, versions[-1].version, "bench", config=cfg)))
    av = versions[-1]
    bucket, _, key = av.tags["peftray.s3_uri"].removeprefix("s3://").partition("/")
    s3 = boto3_s3(cfg)
    keys = [f"{key}/{rel}" for rel in av.files]
    boto_get = lambda: [s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys]  # noqa: E731
    boto_get()  # warm the client's connection pool
    cold, cold_ref, cached, boto = [], [], [], []
    for i in range(repeats):  # interleaved, so drift in machine load hits both sides alike
        fresh = dataclasses.replace(cfg, cache_dir=tmp / f"cache-{i}")
        cold.append(_timed(lambda: R.fetch(av, fresh)))
        boto.append(_timed(boto_get))
        cold_ref.append(_timed(lambda: R.fetch(f"{name}@bench", dataclasses.replace(cfg, cache_dir=tmp / f"ref-{i}"))))
    warm = dataclasses.replace(cfg, cache_dir=tmp / "cache-0")
    for _ in range(max(5, repeats)):
        cached.append(_timed(lambda: R.fetch(av, warm)))
    result = {
        "adapter_bytes": nbytes, "files": len(av.files), "repeats": repeats,
        "fetch_cold": _stats(cold), "fetch_cold_by_alias": _stats(cold_ref), "fetch_cached": _stats(cached),
        "boto3_get_baseline": _stats(boto), "register": _stats(reg), "promote": _stats(pro),
    }
    med = {k: v["median_s"] for k, v in result.items() if isinstance(v, dict)}
    result["ratios"] = {
        "fetch_cold_over_boto3": med["fetch_cold"] / med["boto3_get_baseline"],
        "fetch_cached_over_boto3": med["fetch_cached"] / med["boto3_get_baseline"],
        "fetch_cold_over_cached": med["fetch_cold"] / med["fetch_cached"],
    }
    return result


def _print(result: dict[str, Any]) -> None:
    mb = result["adapter_bytes"] / 2**20
    rows = []
    for label, key in [("fetch, cold cache", "fetch_cold"), ("fetch name@alias, cold cache", "fetch_cold_by_alias"),
                       ("fetch, cached (verified)", "fetch_cached"), ("boto3 get_object (baseline)", "boto3_get_baseline"),
                       ("register", "register"), ("promote", "promote")]:
        s = result[key]
        rate = f"{mb / s['median_s']:.0f}" if key.startswith(("fetch", "boto3")) else ""
        rows.append((label, f"{s['median_s'] * 1000:.1f}", f"{s['min_s'] * 1000:.1f}", f"{s['max_s'] * 1000:.1f}", rate))
    print(f"adapter: {mb:.1f} MB in {result['files']} files, {result['repeats']} repeats")
    print(table(["operation", "median ms", "min ms", "max ms", "MB/s"], rows))
    r = result["ratios"]
    print(f"\nfetch cold / boto3 GET = {r['fetch_cold_over_boto3']:.2f}x   "
          f"fetch cached / boto3 GET = {r['fetch_cached_over_boto3']:.2f}x   "
          f"cold / cached = {r['fetch_cold_over_cached']:.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftray bench registry", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=10.0, help="adapter size (default 10 MB)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench-results/registry.json")
    args = parser.parse_args(argv)
    with local_stack("peftray-bench-registry-") as cfg, tempfile.TemporaryDirectory(prefix="peftray-bench-registry-") as tmp:
        result = run(cfg, Path(tmp), args.size_mb, args.repeats)
    _print(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0
