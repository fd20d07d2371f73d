"""Building blocks shared by the layer-injecting methods (LoRA, IA3): the adapter-layer base class, the
`modules_to_save` wrapper, and access to a base layer's dense weight (nn.Linear, GPT-2 Conv1D, bitsandbytes 4-bit).
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from peftray.errors import AdapterFormatError
from peftray.tuners.mixed import current_mixed_batch


class AdapterLayer(nn.Module):
    """A base layer plus per-adapter weights held in dicts keyed by adapter name.

    Subclasses list the dict attributes holding trainable weights in `adapter_layer_names` and the plain
    per-adapter values (rank, scaling) in `other_param_names`; `adapter_tensors()` maps saved key suffixes
    (the HF PEFT names, without the adapter name) to the live parameters, which is how save and load work.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    # False for adapters that are copies of base modules (LN tuning): they keep the base dtype on a half-precision
    # base instead of becoming float32 (`upcast_adapter_weights`), as in HF PEFT.
    cast_adapter_dtype: bool = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []
        self._saved_base: tuple | None = None  # exact copy of the base weights while merged
        self._generation = 0  # bumped whenever an adapter is added or removed

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda(): cached copies of the adapter weights (LoRA's mixed-batch stacks) are stale
        self._generation += 1
        return super()._apply(fn, *args, **kwargs)

    # Model code sometimes reads `layer.weight` (e.g. T5 checks wo.weight.dtype): show the base layer's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # --- adapters -------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for name in getattr(self, attr).keys():
                if name not in names:
                    names.append(name)
        return names

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_adapter(self, names: Iterable[str], trainable: bool = True) -> None:
        """Activate `names`; only active adapters' weights require grad (and only when `trainable`)."""
        self.active_adapters = list(names)
        for attr in self.adapter_layer_names:
            for name, holder in getattr(self, attr).items():
                params = [holder] if isinstance(holder, nn.Parameter) else list(holder.parameters())
                for p in params:
                    p.requires_grad_(trainable and name in self.active_adapters)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self._generation += 1

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_adapter_tensors(self, name: str, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Copy saved tensors into adapter `name`; AdapterFormatError names any tensor with the wrong shape."""
        live = self.adapter_tensors(name)
        for suffix, param in live.items():
            t = tensors[suffix]
            if tuple(t.shape) != tuple(param.shape):
                raise AdapterFormatError(
                    f"tensor `{prefix}{suffix}` has shape {tuple(t.shape)} but the base model needs "
                    f"{tuple(param.shape)}: the adapter was made for another base model or config.")
            with torch.no_grad():
                param.copy_(t.to(device=param.device, dtype=param.dtype))

    # --- merging --------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters into the base weight; `unmerge()` restores the exact original bits."""
        names = [n for n in (names or self.active_adapters) if n in self.adapters and n not in self.merged_adapters]
        if not names:
            return
        if self._saved_base is None:
            self._saved_base = save_base(self.base_layer)
        for name in names:
            self._merge_one(name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if self._saved_base is not None:
            restore_base(self.base_layer, self._saved_base)
        self._saved_base = None
        self.merged_adapters = []

    def _merge_one(self, name: str) -> None:
        w = base_weight(self.base_layer)
        set_base_weight(self.base_layer, w + self.delta_weight(name).to(w.dtype))


def upcast_adapter_weights(model: nn.Module, adapter_name: str) -> None:
    """HF PEFT's `autocast_adapter_dtype=True`: adapter `adapter_name`'s float16/bfloat16 weights become float32.

    On a half-precision base the optimizer then updates float32 weights (a bf16 weight drops updates below
    2^-8 of its size); the forward casts them to the compute dtype, or autocast does.
    """
    for module in model.modules():
        if isinstance(module, AdapterLayer) and module.cast_adapter_dtype:
            for param in module.adapter_tensors(adapter_name).values():
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
            module._generation += 1


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense [out, in] (Linear) or [num, dim] (Embedding) tensor."""
    weight = layer.weight
    if type(layer).__name__ == "Linear4bit":
        import bitsandbytes.functional as bnbf  # QLoRA only: imported when such a layer is met

        # dequantised in the quant state's dtype (often bf16); merging happens in fp32 as in PEFT
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    if type(layer).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return weight.data.T
    return weight.data


def set_base_weight(layer: nn.Module, dense: torch.Tensor) -> None:
    if type(layer).__name__ == "Linear4bit":
        import bitsandbytes as bnb

        old = layer.weight
        # Same recipe as PEFT: the old parameter's settings, marked "not yet quantised" so that moving it to
        # its device quantises the new dense weight.
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(bnb_quantized=False, requires_grad=False)
        layer.weight = bnb.nn.Params4bit(dense.to("cpu"), **kwargs).to(old.device)
    elif type(layer).__name__ == "Conv1D":
        layer.weight.data = dense.T.contiguous()
    else:
        layer.weight.data = dense


def save_base(layer: nn.Module) -> tuple:
    # Merging assigns new tensors to `.data` (never writes in place), so references keep the original bits.
    bias = getattr(layer, "bias", None)
    return layer.weight, layer.weight.data, None if bias is None else bias.data


def restore_base(layer: nn.Module, saved: tuple) -> None:
    param, data, bias = saved
    layer.weight = param
    layer.weight.data = data
    if bias is not None:
        layer.bias.data = bias


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    if type(layer).__name__ == "Conv1D":
        return layer.weight.shape[0], layer.weight.shape[1]
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    raise AdapterFormatError(f"cannot adapt a layer of type {type(layer).__name__}: it has no in/out features")


class ModulesToSaveWrapper(nn.Module):
    """A frozen original module plus one trainable full copy per adapter (e.g. a classifier head)."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.add(adapter_name)

    def add(self, name: str) -> None:
        if name not in self.modules_to_save:
            self.modules_to_save[name] = copy.deepcopy(self.original_module)
        for p in self.original_module.parameters():
            p.requires_grad_(False)

    def set_adapter(self, names: Iterable[str], trainable: bool = True) -> None:
        names = [n for n in names if n in self.modules_to_save]
        self.active_adapter = names[0] if names else None
        for name, mod in self.modules_to_save.items():
            for p in mod.parameters():
                p.requires_grad_(trainable and name == self.active_adapter)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        mixed = current_mixed_batch()
        if mixed is not None and not self.disabled and args and torch.is_tensor(args[0]):
            return self._mixed_forward(mixed, args[0], *args[1:], **kwargs)
        return self.current()(*args, **kwargs)

    def _mixed_forward(self, mixed, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row through its own adapter's copy (rows of the base model, or of an adapter without a copy
        here, through the original module): one call per adapter present in the batch, as HF PEFT does."""
        if x.shape[0] != mixed.indices.shape[0]:
            raise ValueError(f"adapter_names has {mixed.indices.shape[0]} entries but the batch has {x.shape[0]} rows")
        out = None
        for slot in mixed.indices.unique().tolist():
            name = mixed.order[slot] if slot >= 0 else None
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            rows = (mixed.indices == slot).nonzero().flatten()
            y = module(x[rows], *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # the wrapped module's attributes (e.g. a head's out_features) stay reachable
            return getattr(super().__getattr__("original_module"), name)
