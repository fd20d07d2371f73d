"""`peftray bench images`: text-to-image LoRA, peftray against diffusers + Hugging Face PEFT in one process.

Two sections, each arm timed against its baseline in the same run, the arms alternating over the repetitions
(so machine noise hits both alike); the table shows each arm's median and the median of the per-repetition
ratios with its interquartile range:

1. `train`: one LoRA training step on the pipeline's UNet (forward, MSE on the noise, backward, AdamW),
   peftray vs HF PEFT, same UNet, same LoRA config (r, alpha, to_q/to_k/to_v/to_out.0), same initial weights;
   the loss curves must agree. Beside them, the ceiling: the same step on the UNet with no adapter (backward to
   the input), which bounds the speed-up any LoRA implementation can show over HF PEFT on this machine.
2. `generate`: 4 requests for 4 different adapters, denoised by peftray's serving engine in one mixed batch
   (one UNet call per step) vs diffusers with the 4 adapters loaded, `set_adapters` and one pipeline call per
   request; the same seeds, so the images must agree. Beside them, the ceiling: the plain UNet called over all
   the requests' rows at once vs once per request (what batching itself saves on this machine).

The pipeline is the tiny Stable Diffusion folder (`peftray make-tiny-model --kind sd`, made in a temporary
folder; `--image-size 64` gives it 32x32 latents) or any Stable Diffusion pipeline folder (`--pipeline DIR`).
Writes bench-results/images.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from peftray.bench._tuners_setup import CLOCK, CLOCKS
from peftray.bench.common import write_results
from peftray.tables import table

SECTIONS = ("train", "generate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="peftray bench images", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of: " + ",".join(SECTIONS))
    p.add_argument("--pipeline", default=None, help="a Stable Diffusion pipeline folder (default: the tiny one)")
    p.add_argument("--image-size", type=int, default=64, help="image side of the tiny pipeline (multiple of 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both arms run there, in float32)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads for all")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or process CPU time (steadier on a busy CPU machine; not for --device cuda)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per arm (default 10; --quick 2)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--batch", type=int, default=4, help="training batch (images)")
    p.add_argument("--adapters", type=int, default=4, help="requests (each its own adapter) in `generate`")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per request in `generate`")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (> 1: two UNet rows per image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results/images.json", help="where to write the JSON results")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.image_size % 8 or args.image_size < 16:
        p.error(f"--image-size must be a multiple of 8 and at least 16, got {args.image_size}")
    if min(args.rank, args.batch, args.adapters, args.steps) < 1:
        p.error("--rank, --batch, --adapters and --steps must be >= 1")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device must be cpu or cuda (with a CUDA GPU present), got {args.device!r}")
    args.repeats = args.repeats or (2 if args.quick else 10)
    return args


def run(args, work: Path) -> dict:
    from peftray.bench import _images_arms as arms

    # say at once, before any model is built, when the baseline is missing
    arms.peft_baseline("images", "diffusers + Hugging Face PEFT")
    _quiet()
    torch.set_num_threads(args.threads)
    CLOCK["now"] = CLOCKS[args.clock]
    warmup = 1
    pipe_dir = Path(args.pipeline) if args.pipeline else _tiny_pipeline(work, args.image_size)
    results: dict = {"config": {"threads": args.threads, "clock": args.clock, "repeats": args.repeats,
                                "device": args.device,
                                "pipeline": str(args.pipeline or f"tiny SD, {args.image_size}x{args.image_size}"),
                                "load_avg_at_start": os.getloadavg()[0], "torch": torch.__version__,
                                "machine": platform.machine(), "cpus": os.cpu_count()}}
    sections = args.sections.split(",")
    if "train" in sections:
        results["train"] = arms.run_train(pipe_dir, rank=args.rank, batch=args.batch, seed=args.seed,
                                          repeats=args.repeats, warmup=warmup, device=args.device)
    if "generate" in sections:
        folders = arms.make_adapters(pipe_dir, work / "adapters", args.adapters, args.rank, args.seed)
        results["generate"] = arms.run_generate(pipe_dir, folders, steps=args.steps, guidance=args.guidance,
                                                seed=args.seed, repeats=args.repeats, warmup=warmup,
                                                device=args.device)
    return results


def _quiet() -> None:
    """No progress bars or LoRA-loading notices from diffusers and transformers between the table's lines."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # diffusers' second adapter


def _tiny_pipeline(work: Path, size: int) -> Path:
    from peftray.tiny_sd import TinySDSpec, make_tiny_sd

    return make_tiny_sd(work / "tiny-sd", TinySDSpec(image_size=size))


def render(r: dict) -> str:
    def ratio(x: dict) -> tuple[str, str]:
        return f"{x['median']:.2f}x", f"{x['p25']:.2f}-{x['p75']:.2f}"

    rows = []
    if "train" in r:
        t = r["train"]
        rows.append([f"train step (batch {t['batch']}, r={t['rank']})", f"{t['peftray']['ms']:.1f}",
                     f"HF PEFT {t['hf_peft']['ms']:.1f}", *ratio(t["ratio"]),
                     f"loss diff {t['loss_max_abs_diff']:.1e}"])
        rows.append(["  ceiling: the same step with no adapter (backward to the input)", f"{t['no_adapter']['ms']:.1f}",
                     f"HF PEFT {t['hf_peft']['ms']:.1f}", *ratio(t["ceiling"]), "no LoRA step is faster"])
    if "generate" in r:
        g = r["generate"]
        rows.append([f"{g['requests']} requests x {g['requests']} adapters, {g['steps']} steps, {g['size']}",
                     f"{g['peftray']['ms']:.1f}", f"diffusers set_adapters {g['diffusers']['ms']:.1f}",
                     *ratio(g["ratio"]), f"image diff {g['image_max_abs_diff']:.1e}"])
        rows.append([f"  ceiling: one UNet call over all {g['requests']} requests' rows",
                     f"{g['unet_batched']['ms']:.1f}",
                     f"one call per request {g['unet_serial']['ms']:.1f}", *ratio(g["ceiling"]),
                     "what batching can save"])
    out = table(["measurement", "peftray ms", "baseline ms", "speed-up (median)", "IQR", "agreement"], rows)
    if "generate" in r:
        out += f"\nUNet rows per step in peftray's batch: {r['generate']['unet_rows_per_step']}"
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write the JSON. Returns 0."""
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftray-bench-images-") as work:
        results = run(args, Path(work))
    results["config"]["wall_s"] = round(time.perf_counter() - start, 1)
    print(render(results))
    write_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
