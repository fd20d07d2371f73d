"""Shared pieces of `peftray bench tuners`: the model, the two LoRA implementations side by side, timing.

HF PEFT (`peft`) is the baseline, so it is imported here, lazily, and only by the benchmark; it comes with
the `test` extra (`pip install -e '.[test]'` in the checkout). Nothing else in peftray imports it.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from typing import Callable

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(seed: int, vocab: int = 4096):
    """The issue's Llama: hidden 512, 4 layers, 8 heads / 4 kv heads (GQA), intermediate 1376, fp32, random."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=4, vocab_size=vocab, intermediate_size=1376,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    return model


def peft_baseline(bench: str = "tuners", against: str = "Hugging Face PEFT"):
    """The `peft` module, or a clear error (naming `peftray bench BENCH` and its baseline) when the test extra is
    not installed."""
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from peftray.errors import ConfigError

        raise ConfigError(f"`peftray bench {bench}` compares against {against}, and Hugging Face PEFT (`peft`) is "
                          "not installed; install the test extra: pip install -e '.[test]' in the checkout.") from exc
    return peft


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Median of the per-repetition ratios numerator/denominator (the arms alternate, so each pair saw the same
    machine noise) and their interquartile range, the spread."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]  # noqa: E731
    return {"median": statistics.median(ratios), "p25": q(0.25), "p75": q(0.75), "n": len(ratios)}


def lora_pair(base, config_kwargs: dict, adapters: list[str]):
    """(HF PEFT model, peftray model) on deep copies of `base`, same adapters, peftray's weights copied from HF's.

    The first adapter is created by get_peft_model, the rest by add_adapter, on both sides.
    """
    import peftray

    peft = peft_baseline()
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs), adapter_name=adapters[0])
    ours = peftray.get_peft_model(copy.deepcopy(base), peftray.LoraConfig(**config_kwargs),
                                  adapter_name=adapters[0])
    for name in adapters[1:]:
        hf.add_adapter(name, peft.LoraConfig(**config_kwargs))
        ours.add_adapter(name, peftray.LoraConfig(**config_kwargs))
    copy_lora_weights(hf, ours)
    return hf, ours


def randomize_lora(model, seed: int, std: float = 0.02) -> None:
    """Non-zero A and B (a zero B would make every adapter the base model, hiding mixing bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def copy_lora_weights(src, dst) -> int:
    """Copy every LoRA tensor from src to dst by parameter name (both use PEFT's names); returns the count."""
    src_params = {n: p for n, p in src.named_parameters() if "lora_" in n}
    dst_params = {n: p for n, p in dst.named_parameters() if "lora_" in n}
    if set(src_params) != set(dst_params):
        missing = sorted(set(src_params) ^ set(dst_params))[:5]
        raise RuntimeError(f"LoRA parameter names differ between HF PEFT and peftray, e.g. {missing}")
    with torch.no_grad():
        for name, p in dst_params.items():
            p.copy_(src_params[name])
    return len(dst_params)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = {"now": time.perf_counter}  # set by `--clock`; cpu = process CPU time, steadier on a busy shared machine


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, run round-robin so that machine noise hits every variant alike. Each round
    runs the variants in a new order (shuffled, seeded: the same every run), never one variant twice in a row, so
    that every variant follows each of the others about equally often: what a call leaves behind (a cold cache,
    freed memory) weighs on the next one, and a fixed order hands the same variant's leftovers to the same next
    variant every time."""
    clock = CLOCK["now"]
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    rng, order = random.Random(len(fns)), list(fns)
    for _ in range(repeats):
        last = order[-1]
        rng.shuffle(order)
        if len(order) > 1 and order[0] == last:
            order.append(order.pop(0))
        for name in order:
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    return times


def median_ms(samples: list[float]) -> float:
    return 1000.0 * statistics.median(samples)


def rss_kb() -> int:
    """Current resident set size in KiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:  # pragma: no cover - non-Linux
        return 0
