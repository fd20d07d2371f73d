"""Training-step section of `peftray bench tuners`: full fine-tuning vs HF PEFT LoRA vs peftray LoRA.

Timing and loss curves run in the benchmark's process (variants interleaved step by step). Peak memory is
measured per variant in a fresh subprocess (`python -m peftray.bench._tuners_train VARIANT ...`) from the
kernel's high-water mark VmHWM, because the peak RSS of a process never goes down and torch's CPU
allocations are invisible to tracemalloc.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys

import torch

from peftray.bench._tuners_setup import build_base, lora_pair, median_ms, rss_kb, time_interleaved

BATCH, SEQ, RANK, LR = 4, 256, 16, 2e-4
VARIANTS = ("full", "hf_peft", "peftray")
# The LoRA arithmetic floor: the frozen model's forward and input-gradient backward, no adapter, no weight
# gradient, no optimizer. Timed (not a goal) so that a ratio to HF PEFT can be judged against what is possible.
FLOOR = "floor_frozen"
# peftray with the model's own (transformers') loss instead of its fused one: separates what the LoRA layers
# gain from what the loss gains. Timed only (same init as "peftray", so its loss curve must match too).
UNFUSED = "peftray_model_loss"


def lora_kwargs() -> dict:
    return dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules="all-linear")


def make_variants(seed: int, which=VARIANTS, vocab: int = 4096
                  ) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    """Each variant's model in train mode and its AdamW; the LoRA sides share one init (copied HF -> peftray)."""
    base = build_base(seed, vocab)
    models: dict[str, torch.nn.Module] = {}
    if "full" in which:
        models["full"] = copy.deepcopy(base)
    if FLOOR in which:
        models[FLOOR] = copy.deepcopy(base).requires_grad_(False)
        models[FLOOR].enable_input_require_grads()  # the embedding output requires grad: dx flows, no dW
    if "hf_peft" in which or "peftray" in which:
        hf, ours = lora_pair(base, lora_kwargs(), ["default"])
        if "hf_peft" in which:
            models["hf_peft"] = hf
        if "peftray" in which:
            models["peftray"] = ours
        if UNFUSED in which:
            models[UNFUSED] = copy.deepcopy(ours)
            models[UNFUSED].use_fused_loss = False
    out = {}
    for name, model in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        out[name] = (model, torch.optim.AdamW(params, lr=LR) if params else None)
    return out


def make_batches(seed: int, n: int, vocab: int = 4096) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, vocab, (BATCH, SEQ), generator=gen) for _ in range(n)]


def train_step(model, opt, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def run(seed: int, steps: int, warmup: int, threads: int, memory: bool, vocab: int = 4096) -> dict:
    """Times `steps` steps per variant after `warmup`, records every loss, optionally measures memory."""
    variants = make_variants(seed, which=(*VARIANTS, UNFUSED, FLOOR), vocab=vocab)
    batches = make_batches(seed, warmup + steps, vocab)
    losses: dict[str, list[float]] = {name: [] for name in variants}
    counter = {name: 0 for name in variants}

    def stepper(name):
        def fn():
            model, opt = variants[name]
            losses[name].append(train_step(model, opt, batches[counter[name]]))
            counter[name] += 1
        return fn

    times = time_interleaved({name: stepper(name) for name in variants}, repeats=steps, warmup=warmup)
    result = {name: {"ms": median_ms(times[name]), "tokens_per_s": BATCH * SEQ / (median_ms(times[name]) / 1000),
                     "losses": losses[name]} for name in variants}
    hf_l, our_l = losses["hf_peft"], losses["peftray"]
    result["loss_max_abs_diff"] = max(abs(x - y) for x, y in zip(hf_l, our_l))
    result["unfused_loss_max_abs_diff"] = max(abs(x - y) for x, y in zip(losses[UNFUSED], our_l))
    result["vocab"] = vocab
    if memory:
        for name in VARIANTS:
            result[name]["memory"] = measure_memory(name, seed, threads, vocab=vocab)
    return result


def measure_memory(variant: str, seed: int, threads: int, steps: int = 3, vocab: int = 4096) -> dict:
    """Peak RSS of a fresh process that builds the variant and trains `steps` steps (KiB -> MiB)."""
    cmd = [sys.executable, "-m", "peftray.bench._tuners_train", variant, "--seed", str(seed),
           "--threads", str(threads), "--steps", str(steps), "--vocab", str(vocab)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one variant's peak memory (internal to `peftray bench tuners`)")
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--vocab", type=int, default=4096)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, opt = make_variants(args.seed, which=(args.variant,), vocab=args.vocab)[args.variant]
    batches = make_batches(args.seed, args.steps, args.vocab)
    before = rss_kb()  # the model is built; what training adds comes on top of this
    for ids in batches:
        train_step(model, opt, ids)
    peak, method = peak_rss_kb()
    print(json.dumps({"peak_rss_mib": round(peak / 1024, 1), "model_rss_mib": round(before / 1024, 1),
                      "train_peak_over_model_mib": round((peak - before) / 1024, 1), "method": method}))


def peak_rss_kb() -> tuple[int, str]:
    """This process's peak RSS in KiB. VmHWM first: ru_maxrss survives execve on Linux, so a child started by a
    big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]), "VmHWM (/proc/self/status)"
    except OSError:  # pragma: no cover - non-Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


if __name__ == "__main__":
    _memory_main()
