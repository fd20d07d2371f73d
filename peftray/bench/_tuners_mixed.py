"""Mixed-adapter sections of `peftray bench tuners`: decode-like step, prefill, logits, and the bare kernel.

One base model, 16 LoRA adapters (r=16 on q,k,v,o,gate,up,down, random non-zero A and B), loaded in HF PEFT
and (same weights) in peftray; rows are spread over the adapters round-robin, so they are not pre-grouped.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from peftray.bench._tuners_setup import (PROJECTIONS, build_base, copy_lora_weights, lora_pair, median_ms,
                                         paired_ratio, randomize_lora, time_interleaved)

N_ADAPTERS, RANK = 16, 16


class MixedModels:
    """The base model alone, and HF PEFT / peftray with the same adapters (16 by default), all in eval mode."""

    def __init__(self, seed: int, n_adapters: int = N_ADAPTERS):
        self.base = build_base(seed).eval()
        self.names = [f"a{i}" for i in range(n_adapters)]
        kwargs = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=list(PROJECTIONS))
        self.hf, self.ours = lora_pair(self.base, kwargs, self.names)
        randomize_lora(self.hf, seed)
        copy_lora_weights(self.hf, self.ours)
        self.hf.eval()
        self.ours.eval()

    def row_names(self, rows: int) -> list[str]:
        return [self.names[i % len(self.names)] for i in range(rows)]

    def single(self, model, ids):
        model.set_adapter(self.names[0])
        return model(input_ids=ids, use_cache=False).logits


def _ids(seed: int, rows: int, tokens: int) -> torch.Tensor:
    return torch.randint(0, 4096, (rows, tokens), generator=torch.Generator().manual_seed(seed + 7))


def run_forward(models: MixedModels, seed: int, rows: int, tokens: int, repeats: int, warmup: int) -> dict:
    """Median forward time of: base alone, each side with one adapter, each side with adapter_names, and peftray's
    mixed forward inside one `fixed_adapter_weights` scope (`peftray_generate`: as the decode steps of one
    `generate` call or the serving engine run, the stacked adapter copies checked once, not on every call)."""
    from peftray.tuners.mixed import fixed_adapter_weights

    ids, names = _ids(seed, rows, tokens), models.row_names(rows)
    scope = object()

    def ours_generate():
        with fixed_adapter_weights(scope):
            return models.ours(input_ids=ids, adapter_names=names, use_cache=False).logits

    fns = {
        "base": lambda: models.base(input_ids=ids, use_cache=False).logits,
        "hf_peft_1": lambda: models.single(models.hf, ids),
        "peftray_1": lambda: models.single(models.ours, ids),
        "hf_peft_mixed": lambda: models.hf(input_ids=ids, adapter_names=names, use_cache=False).logits,
        "peftray_mixed": lambda: models.ours(input_ids=ids, adapter_names=names, use_cache=False).logits,
        "peftray_generate": ours_generate,
        "peftray_mixed_pytorch": lambda: _without_kernel(models, ids, names),
    }
    with torch.inference_mode():
        times = time_interleaved(fns, repeats, warmup)
    out = {name: {"ms": median_ms(t), "tokens_per_s": rows * tokens / (median_ms(t) / 1000)}
           for name, t in times.items()}
    out["ratios"] = {f"{arm}/base": paired_ratio(times[arm], times["base"])
                     for arm in ("peftray_mixed", "peftray_generate", "peftray_mixed_pytorch", "hf_peft_mixed")}
    out["ratios"]["hf_peft_mixed/peftray_mixed"] = paired_ratio(times["hf_peft_mixed"], times["peftray_mixed"])
    return out


def _without_kernel(models: MixedModels, ids, names):
    """peftray's mixed forward with the compiled CPU kernel switched off: the PyTorch (bmm) path, as before it."""
    from peftray.ops import cpu_kernel

    with cpu_kernel.use(False):
        return models.ours(input_ids=ids, adapter_names=names, use_cache=False).logits


def run_cached_decode(models: MixedModels, seed: int, rows: int, prompt_len: int, repeats: int, warmup: int) -> dict:
    """The serving engine's decode step: one new token per row on top of a KV cache of `prompt_len` tokens
    (the cache is cropped back after each timed step, so every repeat decodes the same position). Arms: the plain
    mixed forward (stacked adapter copies checked on every call), `peftray_engine` (inside one
    `fixed_adapter_weights` scope, as the engine and `generate` run their steps), the PyTorch path, the base."""
    from peftray.ops import cpu_kernel
    from peftray.tuners.mixed import fixed_adapter_weights

    ids, names = _ids(seed, rows, prompt_len), models.row_names(rows)
    nxt = _ids(seed + 1, rows, 1)
    caches = {}
    with torch.inference_mode():
        caches["base"] = models.base(input_ids=ids, use_cache=True).past_key_values
        caches["ours"] = models.ours(input_ids=ids, adapter_names=names, use_cache=True).past_key_values

        def step(model, cache, **kw):
            model(input_ids=nxt, past_key_values=cache, use_cache=True, **kw)
            cache.crop(-1)  # drop the token just added

        def ours_pytorch():
            with cpu_kernel.use(False):
                step(models.ours, caches["ours"], adapter_names=names)

        scope = object()  # as the engine runs its steps: adapter weights change only through add/delete

        def ours_engine():
            with fixed_adapter_weights(scope):
                step(models.ours, caches["ours"], adapter_names=names)

        fns = {"base": lambda: step(models.base, caches["base"]),
               "peftray_mixed": lambda: step(models.ours, caches["ours"], adapter_names=names),
               "peftray_engine": ours_engine, "peftray_mixed_pytorch": ours_pytorch}
        times = time_interleaved(fns, repeats, warmup)
    out = {name: {"ms": median_ms(t), "tokens_per_s": rows / (median_ms(t) / 1000)} for name, t in times.items()}
    out["ratios"] = {f"{arm}/base": paired_ratio(times[arm], times["base"])
                     for arm in ("peftray_mixed", "peftray_engine", "peftray_mixed_pytorch")}
    return out


def run_adapter_counts(seed: int, counts: list[int], repeats: int, warmup: int, rows: int = 32) -> dict:
    """Decode step (rows x 1 token) at each adapter count: base, HF PEFT, peftray (kernel and PyTorch path)."""
    out = {}
    for n in counts:
        models = MixedModels(seed, n)
        res = run_forward(models, seed, rows, 1, repeats, warmup)
        out[str(n)] = {k: res[k] for k in ("base", "hf_peft_mixed", "peftray_mixed", "peftray_mixed_pytorch",
                                           "ratios")}
        del models
    return out


def logits_diff(models: MixedModels, seed: int, rows: int, tokens: int) -> dict:
    """Max |logits| difference, mixed batch, HF PEFT vs peftray; plus a check that mixing changes the output."""
    ids, names = _ids(seed, rows, tokens), models.row_names(rows)
    with torch.inference_mode():
        hf = models.hf(input_ids=ids, adapter_names=names, use_cache=False).logits
        ours = models.ours(input_ids=ids, adapter_names=names, use_cache=False).logits
        base = models.base(input_ids=ids, use_cache=False).logits
    return {"max_abs_diff": float((hf - ours).abs().max()), "adapters_vs_base_max_abs": float((hf - base).abs().max())}


def run_kernel(seed: int, repeats: int, warmup: int, n_in: int = 512, n_out: int = 1376) -> dict:
    """One gate_proj-sized layer: peftray's lora_delta vs a per-adapter loop vs HF PEFT's per-layer loop."""
    from peftray.ops import RowPlan, lora_delta
    from peftray.ops import lora as lora_ops

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(N_ADAPTERS, RANK, n_in, generator=gen) * 0.02
    b = torch.randn(N_ADAPTERS, n_out, RANK, generator=gen) * 0.02
    scaling = torch.full((N_ADAPTERS,), 2.0)
    weight = torch.randn(n_out, n_in, generator=gen) * 0.02
    out = {}
    for label, rows, tokens in (("decode 32x1", 32, 1), ("prefill 16x128", 16, 128)):
        x = torch.randn(rows, tokens, n_in, generator=gen)
        slots = [i % N_ADAPTERS for i in range(rows)]
        names = [f"a{s}" for s in slots]
        plan = RowPlan.from_indices(slots)
        fns = {
            "base F.linear": lambda: F.linear(x, weight),
            "lora_delta": lambda: lora_delta(x, a, b, scaling, plan),
            "base + lora_delta(out=base)": lambda: lora_delta(x, a, b, scaling, plan, out=F.linear(x, weight)),
            "segment loop (sorted once)": lambda: lora_ops._scatter(
                lora_ops._segments(x, a, b, scaling, plan), "active", plan),
            "HF-style loop (rows found per layer)": lambda: _hf_style(x, a, b, scaling, names, weight),
            "plan build (once per forward)": lambda: RowPlan.from_indices(slots),
        }
        with torch.inference_mode():
            times = time_interleaved(fns, repeats, warmup)
        out[label] = {name: median_ms(t) for name, t in times.items()}
    return out


def _hf_style(x, a, b, scaling, names, weight):
    """HF PEFT's LoraLayer._mixed_batch_forward, on bare tensors (base + per-adapter sub-batch loop)."""
    result = F.linear(x, weight)
    for adapter in set(names):
        rows = [i for i, n in enumerate(names) if n == adapter]
        slot = int(adapter[1:])
        sub = x[rows]
        result[rows] += F.linear(F.linear(sub, a[slot]), b[slot]) * scaling[slot]
    return result
