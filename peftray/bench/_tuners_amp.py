"""Autocast-bf16 section of `peftray bench tuners`: the LoRA training step under `torch.autocast(bf16)` (what
Trainer's and TRL's `bf16=True` and Accelerate's `mixed_precision="bf16"` run), HF PEFT vs peftray.

Same model, adapter init and batches as the fp32 training step (`_tuners_train`); fp32 base and adapter
weights, bf16 matmuls. Steps alternate between the two arms; each repetition gives one HF/peftray ratio, and
the section reports their median and spread, plus the loss curves' largest difference (bf16 rounding only).
"""

from __future__ import annotations

import statistics

import torch

from peftray.bench._tuners_setup import median_ms, time_interleaved
from peftray.bench._tuners_train import BATCH, SEQ, make_batches, make_variants, train_step

ARMS = ("hf_peft", "peftray")


def run(seed: int, steps: int, warmup: int, vocab: int = 4096) -> dict:
    """Times `steps` interleaved autocast-bf16 training steps per arm after `warmup`; records the losses."""
    variants = make_variants(seed, which=ARMS, vocab=vocab)
    batches = make_batches(seed, warmup + steps, vocab)
    losses: dict[str, list[float]] = {name: [] for name in ARMS}

    def stepper(name):
        def fn():
            model, opt = variants[name]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses[name].append(train_step(model, opt, batches[len(losses[name])]))
        return fn

    times = time_interleaved({name: stepper(name) for name in ARMS}, repeats=steps, warmup=warmup)
    ratios = [h / o for h, o in zip(times["hf_peft"], times["peftray"])]
    out: dict = {name: {"ms": median_ms(times[name]), "tokens_per_s": BATCH * SEQ / (median_ms(times[name]) / 1000)}
                 for name in ARMS}
    out.update(vocab=vocab, speedup_median=statistics.median(ratios), speedup_min=min(ratios),
               speedup_max=max(ratios), loss_max_abs_diff=max(abs(a - b) for a, b in zip(*losses.values())))
    return out


def render(r: dict) -> str:
    return (f"\nLoRA training step under autocast bf16 (4x256 tok, vocab {r['vocab']}): HF PEFT {r['hf_peft']['ms']:.1f} ms, "
            f"peftray {r['peftray']['ms']:.1f} ms; HF/peftray median {r['speedup_median']:.3f}x "
            f"(spread {r['speedup_min']:.3f}-{r['speedup_max']:.3f}); loss curves max |diff| {r['loss_max_abs_diff']:.2e}")
