"""The stacked copies of a LoRA layer's adapters that mixed-adapter batches read, and when they are stale.

A mixed batch applies every loaded adapter of a layer at once, from [N, r_max, in] / [N, out, r_max] stacks
(`peftray.ops.lora_delta`, and the compiled CPU kernel through `AdapterStack.entry`). Building them copies the
weights, so they are kept and checked on every layer call of every mixed forward, which makes the check part of
a decode step's cost (it was a third of peftray's time over the base model at 16 adapters). In steady state it
reads each weight's version counter (in-place changes: optimizer steps, loads, `mul_`) and address (`.data =`,
`.to()` on a lora_A/lora_B module) and nothing else. What needs more than that is seen elsewhere: a replaced
weight or lora_A/lora_B module (a new Parameter, an `assign=True` load) through torch's global registration hooks,
which bump `_EPOCH` when the module registered into is one a stack was built from (model code registers modules
on every forward: transformers' Llama slices its ModuleList of layers); an adapter added or removed, or the
layer moved (`.to()`, `.half()`), through the layer's `_generation`. After either, the next call fetches the
weights again and restacks only if they differ.

The versions and addresses are the check's whole cost: reading them for 32 Parameters a layer costs ~6 µs while
they are in cache but ~30 µs after the base matmuls have evicted them (measured 2026-12-02), ~0.9 ms per decode
step of a 4-layer model with 16 adapters on all seven projections. Inside `fixed_adapter_weights(scope)` a
caller that owns the model (the serving engine; `PeftModel.generate` for one call) promises that adapter weights
change only through adding, loading or deleting adapters, which bump `_generation`: each stack is then checked
once per scope, and later calls in the same scope compare only the key.
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
    weights: list  # the adapter Parameters it copies, and their versions and addresses then
    versions: tuple
    addresses: tuple
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
        if tuple(map(_VERSION, st.weights)) == st.versions and tuple(map(_ADDRESS, st.weights)) == st.addresses:
            if scope is not None:  # a call outside any scope leaves the scope's mark: it found nothing changed
                st.scope = scope
            return st
    # Plain dict reads, not nn.Module.__getattr__ (through which a per-call check once cost a millisecond a step).
    mods_a, mods_b = layer.lora_A._modules, layer.lora_B._modules
    present = [n for n in order if n in mods_a]
    weights = [mods[n]._parameters["weight"] for mods in (mods_a, mods_b) for n in present]
    versions, addresses = tuple(map(_VERSION, weights)), tuple(map(_ADDRESS, weights))
    if st is None or st.key[:3] != key[:3] or len(weights) != len(st.weights) \
            or not all(map(operator.is_, weights, st.weights)) or versions != st.versions or addresses != st.addresses:
        st = _build(layer, order, dtype, weights, versions, addresses)
        for holder in (layer.lora_A, layer.lora_B):
            _WATCHED.add(holder)
            _WATCHED.update(holder[n] for n in present)
    st.key, st.scope = key, scope
    layer._stack = st
    return st


def _build(layer: Any, order: tuple[str, ...], dtype: torch.dtype, weights: list, versions: tuple,
           addresses: tuple) -> AdapterStack:
    from peftray.ops import cpu_kernel, new_stacked_b

    r_max = max([layer.r[n] for n in order if n in layer.lora_A] or [1])
    device = layer.base_layer.weight.device
    a = torch.zeros(len(order), r_max, layer.in_features, dtype=dtype, device=device)
    b = new_stacked_b(len(order), layer.out_features, r_max, dtype=dtype, device=device)
    scaling = torch.zeros(len(order), dtype=dtype, device=device)
    dora = tuple(i for i, n in enumerate(order) if n in layer.lora_magnitude_vector)
    with torch.no_grad():
        for i, n in enumerate(order):
            if n in layer.lora_A and n not in layer.lora_magnitude_vector:
                r = layer.r[n]
                a[i, :r] = layer.lora_A[n].weight
                b[i, :, :r] = layer.lora_B[n].weight
                scaling[i] = layer.scaling[n]
    bt = b.transpose(1, 2)
    entry = None
    if dtype == torch.float32 and device.type == "cpu" and r_max <= cpu_kernel.MAX_RANK:
        entry = cpu_kernel.weights_entry(a, bt, scaling)
    return AdapterStack(a, b, scaling, dora, bt, entry, (), weights, versions, addresses)
