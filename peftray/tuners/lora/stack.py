"""The stacked adapters of a LoRA layer that mixed-adapter batches read, and when they are stale.

A mixed batch applies every loaded adapter of a layer at once, from [N, r_max, in] / [N, out, r_max] stacks
(`peftray.ops.lora_delta`, and the compiled CPU kernel through `AdapterStack.entry`). They are kept between
calls and checked on every layer call of every mixed forward, which makes the check part of a decode step's cost.

Where the stack has the adapters' own dtype and device (the usual case: serving, `generate`), it is not a copy:
each lora_A / lora_B weight is rebound (`.data`) to its slot of the stack, so the stack *is* the adapters' memory
(one copy of each adapter in memory, not two). A weight changed in place by any route, an optimizer step, a
load, `w.mul_()` or `w.data.copy_()`, is then in the stack as it happens; the check only reads each weight's
address, to see a weight given other memory (`.data =`, `.to()` on a lora_A/lora_B module). Only weights whose
memory is their own (or this layer's previous stack) are rebound: a weight that is a view of someone else's
buffer (FSDP's flat parameter) is left alone. Otherwise (another dtype, as under autocast, or such a view) the
stack is a copy, and the check also reads each weight's version counter: in-place changes through the weight
itself are seen, changes through `w.data` are not (torch gives `.data` its own counter).

What needs more than that is seen elsewhere: a replaced weight or lora_A/lora_B module (a new Parameter, an
`assign=True` load) through torch's global registration hooks, which bump `_EPOCH` when the module registered
into is one a stack was built from (model code registers modules on every forward: transformers' Llama slices
its ModuleList of layers); an adapter added or removed, or the layer moved (`.to()`, `.half()`), through the
layer's `_generation`. After either, the next call fetches the weights again and restacks only if they differ.

The reads are the check's whole cost: each read of 32 Parameters' addresses or versions costs ~20 µs once the
base matmuls have evicted them from the cache (measured 2026-12-03), ~0.5 ms per read per decode step of a 4-layer
model with 16 adapters on all seven projections. Inside `fixed_adapter_weights(scope)` a caller that owns the
model (the serving engine; `PeftModel.generate` for one call) promises that adapter weights are not given other
memory, and (for a copied stack) change only through adding, loading or deleting adapters, which bump
`_generation`: each stack is then checked once per scope, and later calls in the same scope compare only the key.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.nn.modules import module as _torch_module

from peftray.tuners.mixed import _FIXED

_EPOCH = [0]
_WATCHED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # lora_A/lora_B dicts and their modules
_VERSION = operator.attrgetter("_version")
_ADDRESS = torch.Tensor.data_ptr


def _registered(module: torch.nn.Module, _name: str, _value: Any) -> None:
    if module in _WATCHED:
        _EPOCH[0] += 1


_torch_module.register_module_parameter_registration_hook(_registered)
_torch_module.register_module_module_registration_hook(_registered)


def _none() -> None:
    return None


@dataclass(eq=False)
class AdapterStack:
    """One layer's adapters in slot order: a [N, r_max, in], b [N, out, r_max] (zero-padded; stored transposed,
    see `new_stacked_b`), scaling [N], the slots of DoRA adapters (not stacked), bt = b transposed ([N, r_max,
    out], contiguous) and the compiled kernel's `weights_entry` for them (None where it cannot read them)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: torch.Tensor
    dora: tuple[int, ...]
    bt: torch.Tensor
    entry: Optional[tuple[int, int, int, int, int]]
    key: tuple  # (slot order, dtype, layer generation, _EPOCH) it was last checked under
    weights: list  # the adapter Parameters it holds (aliased) or copies, and their versions and addresses then
    versions: tuple
    addresses: tuple
    aliased: bool = False  # the weights are views of a and b (see the module docstring): their versions are not read
    scope: Optional[object] = None  # the fixed_adapter_weights scope it was last checked in

    # A copied layer (deepcopy, pickle) restacks from its own weights: `entry` holds this stack's addresses.
    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self):
        return _none, ()


def stacked(layer: Any, order: tuple[str, ...], dtype: torch.dtype) -> AdapterStack:
    """`layer`'s stack for slot order `order` in `dtype`, rebuilt when stale (see the module docstring)."""
    st: Optional[AdapterStack] = layer._stack
    key = (order, dtype, layer._generation, _EPOCH[0])
    scope = _FIXED.get()
    if st is not None and st.key == key:
        if scope is not None and st.scope is scope:
            return st
        if tuple(map(_ADDRESS, st.weights)) == st.addresses \
                and (st.aliased or tuple(map(_VERSION, st.weights)) == st.versions):
            if scope is not None:  # a call outside any scope leaves the scope's mark: it found nothing changed
                st.scope = scope
            return st
    # Plain dict reads, not nn.Module.__getattr__ (through which a per-call check once cost a millisecond a step).
    mods_a, mods_b = layer.lora_A._modules, layer.lora_B._modules
    present = [n for n in order if n in mods_a]
    weights = [mods[n]._parameters["weight"] for mods in (mods_a, mods_b) for n in present]
    versions, addresses = tuple(map(_VERSION, weights)), tuple(map(_ADDRESS, weights))
    if st is None or st.key[:3] != key[:3] or len(weights) != len(st.weights) \
            or not all(map(operator.is_, weights, st.weights)) or addresses != st.addresses \
            or (not st.aliased and versions != st.versions):
        st = _build(layer, order, dtype, weights, versions, st)
        for holder in (layer.lora_A, layer.lora_B):
            _WATCHED.add(holder)
            _WATCHED.update(holder[n] for n in present)
    st.key, st.scope = key, scope
    layer._stack = st
    return st


def _build(layer: Any, order: tuple[str, ...], dtype: torch.dtype, weights: list, versions: tuple,
           previous: Optional[AdapterStack]) -> AdapterStack:
    from peftray.ops import cpu_kernel, new_stacked_b

    r_max = max([layer.r[n] for n in order if n in layer.lora_A] or [1])
    device = layer.base_layer.weight.device
    dora = tuple(i for i, n in enumerate(order) if n in layer.lora_magnitude_vector)
    # Ordinary tensors even when the first mixed forward runs under inference_mode: the weights may be rebound
    # to them, and a weight that became an inference tensor could no longer be trained.
    with torch.inference_mode(False), torch.no_grad():
        a = torch.zeros(len(order), r_max, layer.in_features, dtype=dtype, device=device)
        b = new_stacked_b(len(order), layer.out_features, r_max, dtype=dtype, device=device)
        scaling = torch.zeros(len(order), dtype=dtype, device=device)
        views = []
        for i, n in enumerate(order):
            if n in layer.lora_A and n not in layer.lora_magnitude_vector:
                r = layer.r[n]
                a[i, :r] = layer.lora_A[n].weight
                b[i, :, :r] = layer.lora_B[n].weight
                scaling[i] = layer.scaling[n]
                views += [(layer.lora_A[n].weight, a[i, :r]), (layer.lora_B[n].weight, b[i, :, :r])]
        aliased = bool(views) and len(views) == len(weights) and all(_may_rebind(w, v, previous) for w, v in views)
        if aliased:
            for w, view in views:
                w.data = view
    bt = b.transpose(1, 2)
    entry = None
    if dtype == torch.float32 and device.type == "cpu" and r_max <= cpu_kernel.MAX_RANK:
        entry = cpu_kernel.weights_entry(a, bt, scaling)
    addresses = tuple(map(_ADDRESS, weights))
    return AdapterStack(a, b, scaling, dora, bt, entry, (), weights, versions, addresses, aliased)


def _may_rebind(weight: torch.Tensor, slot: torch.Tensor, previous: Optional[AdapterStack]) -> bool:
    """Whether `weight` may be rebound to `slot`, its place in a new stack: the same dtype, device and shape, and
    a plain Parameter whose memory is its own or the previous stack's (never a view of a buffer something else
    manages, nor a tensor subclass)."""
    if type(weight) is not torch.nn.Parameter or weight.layout is not torch.strided or weight.is_meta \
            or weight.dtype != slot.dtype or weight.device != slot.device or weight.shape != slot.shape:
        return False
    storage = weight.untyped_storage()
    if weight.storage_offset() == 0 and storage.nbytes() == weight.numel() * weight.element_size():
        return True
    return previous is not None and previous.aliased \
        and storage.data_ptr() in (previous.a.untyped_storage().data_ptr(), previous.b.untyped_storage().data_ptr())
