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
from peftray.tuners.lora.stack import AdapterStack, stacked
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
        self._stack: Optional[AdapterStack] = None  # see peftray.tuners.lora.stack

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
    def _stacked(self, order: tuple[str, ...], dtype: torch.dtype) -> AdapterStack:
        """The adapters of this layer stacked in slot order `order` (see `peftray.tuners.lora.stack`)."""
        return stacked(self, order, dtype)

    def _mixed_forward(self, x: torch.Tensor, mixed: MixedBatch) -> torch.Tensor:
        if x.shape[0] != mixed.plan.batch_size:
            raise ValueError(f"adapter_names has {mixed.plan.batch_size} entries but the batch has {x.shape[0]} rows")
        result = self.base_layer(x)
        if mixed.kernel is None or not self._kernel_add_(result, x, mixed):
            result = self._lora_delta_add(result, x, mixed)
        # DoRA adapters are not in the stack (their term depends on the base output): one pass per segment.
        for i in self._stack.dora:
            rows = (mixed.indices == i).nonzero().flatten()
            if rows.numel():
                name = mixed.order[i]
                result = result.index_add(0, rows, self._dora_term(name, x[rows], result[rows]).to(result.dtype))
        return result

    def _kernel_add_(self, result: torch.Tensor, x: torch.Tensor, mixed: MixedBatch) -> bool:
        """result += the rows' LoRA terms through the compiled CPU kernel (decode-sized float32 batches on the
        CPU, no autograd): the lean path, a few attribute reads and one kernel call. False, result untouched,
        where it does not apply."""
        from peftray.ops import cpu_kernel, kernel_rows

        rows = kernel_rows(x, mixed.plan)
        if rows is None or result.dtype is not torch.float32 or not result.is_contiguous() \
                or (mixed.grad and (x.requires_grad or result.requires_grad)):
            return False
        entry = self._stacked(mixed.order, torch.float32).entry
        if entry is None:
            return False
        cpu_kernel.run(mixed.kernel, x, [*entry, result.data_ptr(), self.out_features], rows)
        return True

    def _lora_delta_add(self, result: torch.Tensor, x: torch.Tensor, mixed: MixedBatch) -> torch.Tensor:
        """result + the rows' LoRA terms through `lora_delta` (bmm or segments; any device, dtype, autograd)."""
        from peftray.ops import lora_delta

        amp = autocast_dtype(x)  # under autocast the kernel runs in its dtype (see ops.precision)
        dtype = amp or x.dtype
        st = self._stacked(mixed.order, dtype)
        a, b, scaling = st.a, st.b, st.scaling
        with autocast_off(x) if amp else contextlib.nullcontext():
            if result.dtype == dtype:  # accumulate into the base output (in place when autograd allows)
                return lora_delta(x.to(dtype), a, b, scaling, mixed.plan, out=result)
            return result + lora_delta(x.to(dtype), a, b, scaling, mixed.plan).to(result.dtype)


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
