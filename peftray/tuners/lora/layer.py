"""LoRA layers: `Linear` (nn.Linear, GPT-2 Conv1D, bitsandbytes Linear4bit = QLoRA) and `Embedding`.

In-memory names follow HF PEFT (`lora_A[adapter]` an nn.Linear, `lora_embedding_A[adapter]` a Parameter,
`lora_magnitude_vector[adapter].weight` for DoRA); saved names drop the adapter name.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peftray.errors import ConfigError
from peftray.ops.precision import autocast_dtype, autocast_off
from peftray.tuners.layers import AdapterLayer, base_weight, in_out_features
from peftray.tuners.lora.function import lora_linear
from peftray.tuners.mixed import MixedBatch, current_mixed_batch


class DoraMagnitude(nn.Module):
    """Holds DoRA's magnitude vector as `.weight` (PEFT's in-memory layout)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class LoraLayer(AdapterLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = in_out_features(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self._stack_key: Any = None
        self._stack: Any = None

    def update_layer(self, name: str, r: int, alpha: float, config: Any, init_weights: bool = True) -> None:
        """Add adapter `name` with rank `r`; `init_weights=False` skips initialisation (weights loaded next)."""
        if r <= 0:
            raise ConfigError(f"`r` must be a positive integer, got {r}.")
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        p = float(config.lora_dropout)
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self._create_weights(name, r)
        if init_weights:
            self._init_weights(name, config.init_lora_weights)
        dtype, device = self._weight_dtype_device()
        for attr in ("lora_A", "lora_B"):
            if name in getattr(self, attr):
                getattr(self, attr)[name].to(device=device, dtype=dtype)
        for attr in ("lora_embedding_A", "lora_embedding_B"):
            if name in getattr(self, attr):
                holder = getattr(self, attr)
                holder[name] = nn.Parameter(holder[name].data.to(device=device, dtype=dtype))
        if config.use_dora:
            self._init_dora(name)
        self._generation += 1

    def _weight_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        w = self.base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32  # 4-bit bases train fp32 adapters
        if type(self.base_layer).__name__ == "Linear4bit":
            dtype = getattr(self.base_layer, "compute_dtype", None) or torch.float32
        return dtype, w.device

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        if name in self.lora_A:
            out["lora_A.weight"] = self.lora_A[name].weight
            out["lora_B.weight"] = self.lora_B[name].weight
        if name in self.lora_embedding_A:
            out["lora_embedding_A"] = self.lora_embedding_A[name]
            out["lora_embedding_B"] = self.lora_embedding_B[name]
        if name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight
        return out

    def _dora_norm(self, name: str, lora_weight: torch.Tensor) -> torch.Tensor:
        # Row norm of W + s * BA, detached as DoRA section 4.3 and PEFT do: it gets no gradient.
        w = base_weight(self.base_layer).to(lora_weight.dtype)
        return torch.linalg.norm(w + self.scaling[name] * lora_weight, dim=1).detach()

    def _init_dora(self, name: str) -> None:
        with torch.no_grad():
            norm = self._dora_norm(name, self.delta_weight(name, scaled=False))
        self.lora_magnitude_vector[name] = DoraMagnitude(norm)

    def _merge_one(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            return super()._merge_one(name)
        from peftray.tuners.layers import set_base_weight

        w = base_weight(self.base_layer)
        delta = self.delta_weight(name)
        norm = torch.linalg.norm(w + delta, dim=1)
        factor = (self.lora_magnitude_vector[name].weight / norm).view(-1, 1)
        set_base_weight(self.base_layer, (factor * (w + delta)).to(w.dtype))


class Linear(LoraLayer):
    """LoRA on a layer computing x W^T (+ b): nn.Linear, transformers Conv1D or bitsandbytes Linear4bit."""

    def _create_weights(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def _init_weights(self, name: str, init: Any) -> None:
        if init is False:
            return  # nn.Linear's own init: B is random too, so the adapter changes outputs at once
        if init is True:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
        nn.init.zeros_(self.lora_B[name].weight)

    def delta_weight(self, name: str, scaled: bool = True) -> torch.Tensor:
        """B A (times the scaling) in the [out, in] orientation."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        delta = b @ a
        return delta * self.scaling[name] if scaled else delta

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        x = x.to(a.weight.dtype)
        return b(a(self.lora_dropout[name](x))) * self.scaling[name]

    def _dora_term(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds on top of the base output: (m/||W+sBA|| - 1) (x W^T) + m/||.|| s B A x."""
        a, b = self.lora_A[name], self.lora_B[name]
        lora_w = b.weight @ a.weight
        scale = (self.lora_magnitude_vector[name].weight / self._dora_norm(name, lora_w.detach())).view(1, -1)
        dropout = self.lora_dropout[name]
        xd = dropout(x.to(a.weight.dtype))
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            plain = base_out if bias is None else base_out - bias
        else:  # PEFT recomputes the base product on the dropped-out input
            plain = F.linear(xd, base_weight(self.base_layer).to(xd.dtype))
        return (scale - 1) * plain + scale * b(a(xd)) * self.scaling[name]

    def _fast_ok(self, name: str, x: torch.Tensor) -> bool:
        base = self.base_layer
        return (type(base) is nn.Linear and name in self.lora_A and name not in self.lora_magnitude_vector
                and (not self.training or isinstance(self.lora_dropout[name], nn.Identity))
                and x.dim() >= 2 and (autocast_dtype(x) is not None  # lora_linear casts all to one dtype
                                      or x.dtype == base.weight.dtype == self.lora_A[name].weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        mixed = current_mixed_batch()
        if mixed is not None:
            return self._mixed_forward(x, mixed)
        active = [n for n in self.active_adapters if n in self.lora_A]
        if len(active) == 1 and self._fast_ok(active[0], x):
            base, name = self.base_layer, active[0]
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            return lora_linear(x, base.weight, base.bias, a, b, self.scaling[name])
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            extra = (self._dora_term(name, x, result) if name in self.lora_magnitude_vector
                     else self._lora_term(name, x))
            # added in the wider dtype, then back (as HF PEFT: a float32 adapter on a bf16 base adds in fp32)
            result = (result + extra).to(result.dtype)
        return result

    # --- mixed-adapter batches --------------------------------------------------------------------
    def _stacked(self, order: tuple[str, ...], dtype: torch.dtype) -> tuple[Any, ...]:
        """A [N, r_max, in], B [N, out, r_max] (zero-padded; B stored transposed, see `new_stacked_b`), scaling
        [N] and the slots of DoRA adapters (not stacked), cached until an adapter is added/removed or a weight
        changes (tracked by the tensors' version counters, which in-place optimizer steps and loads bump, and
        their storage, which `.to()` or a replaced tensor changes)."""
        from peftray.ops import new_stacked_b

        # Checked on every layer call of every mixed forward: plain dict reads, not nn.Module.__getattr__
        # (through which this key cost about a millisecond per decode step with 16 adapters).
        mods_a, mods_b = self.lora_A._modules, self.lora_B._modules
        present = [n for n in order if n in mods_a]
        weights = [mods[n]._parameters["weight"] for mods in (mods_a, mods_b) for n in present]
        key = (order, dtype, self.base_layer.weight.device, self._generation,
               tuple([w._version for w in weights]), tuple([w.data_ptr() for w in weights]))
        if key != self._stack_key:
            r_max = max([self.r[n] for n in order if n in self.lora_A] or [1])
            device = self.base_layer.weight.device
            a_st = torch.zeros(len(order), r_max, self.in_features, dtype=dtype, device=device)
            b_st = new_stacked_b(len(order), self.out_features, r_max, dtype=dtype, device=device)
            scaling = torch.zeros(len(order), dtype=dtype, device=device)
            dora = tuple(i for i, n in enumerate(order) if n in self.lora_magnitude_vector)
            with torch.no_grad():
                for i, n in enumerate(order):
                    if n in self.lora_A and n not in self.lora_magnitude_vector:
                        r = self.r[n]
                        a_st[i, :r] = self.lora_A[n].weight
                        b_st[i, :, :r] = self.lora_B[n].weight
                        scaling[i] = self.scaling[n]
            self._stack, self._stack_key = (a_st, b_st, scaling, dora, b_st.transpose(1, 2)), key
        return self._stack

    def _mixed_forward(self, x: torch.Tensor, mixed: MixedBatch) -> torch.Tensor:
        from peftray.ops import lora_delta, lora_delta_small_

        result = self.base_layer(x)
        if x.shape[0] != mixed.indices.shape[0]:
            raise ValueError(f"adapter_names has {mixed.indices.shape[0]} entries but the batch has {x.shape[0]} rows")
        amp = autocast_dtype(x)  # under autocast the kernel runs in its dtype (see ops.precision)
        dtype = amp or x.dtype
        a, b, scaling, dora, bt = self._stacked(mixed.order, dtype)
        if not amp and lora_delta_small_(result, x, a, bt, scaling, mixed.plan):
            pass  # decode-sized float32 batch on the CPU: added in place by the compiled kernel
        else:
            with autocast_off(x) if amp else contextlib.nullcontext():  # entered only when needed: decode is hot
                if result.dtype == dtype:  # accumulate into the base output (in place when autograd allows)
                    result = lora_delta(x.to(dtype), a, b, scaling, mixed.plan, out=result)
                else:
                    result = result + lora_delta(x.to(dtype), a, b, scaling, mixed.plan).to(result.dtype)
        # DoRA adapters are not in the stack (their term depends on the base output): one pass per segment.
        for i in dora:
            rows = (mixed.indices == i).nonzero().flatten()
            if rows.numel():
                name = mixed.order[i]
                result = result.index_add(0, rows, self._dora_term(name, x[rows], result[rows]).to(result.dtype))
        return result


class Embedding(LoraLayer):
    """LoRA on nn.Embedding: lora_embedding_A [r, vocab], lora_embedding_B [dim, r]."""

    def _create_weights(self, name: str, r: int) -> None:
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.in_features))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.out_features, r))

    def _init_weights(self, name: str, init: Any) -> None:
        if init is False:
            nn.init.normal_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])
            return
        nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def _init_dora(self, name: str) -> None:
        raise ConfigError("`use_dora=True` on an Embedding layer is not supported by peftray; leave embeddings out "
                          "of target_modules or set use_dora=False.")

    def delta_weight(self, name: str, scaled: bool = True) -> torch.Tensor:
        delta = (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T
        return delta * self.scaling[name] if scaled else delta

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def _term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        after_a = self._embed(x, self.lora_embedding_A[name].T)
        return (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        mixed: Optional[MixedBatch] = current_mixed_batch()
        if mixed is not None:  # embeddings run once per call: a loop over adapter segments is cheap enough
            for i, name in enumerate(mixed.order):
                rows = (mixed.indices == i).nonzero().flatten()
                if rows.numel() and name in self.lora_embedding_A:
                    result = result.index_add(0, rows, self._term(name, x[rows]).to(result.dtype))
            return result
        for name in self.active_adapters:
            if name in self.lora_embedding_A:
                result = result + self._term(name, x).to(result.dtype)
        return result
