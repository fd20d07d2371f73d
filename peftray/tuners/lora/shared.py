"""LoRA layers that read the same input (q/k/v, gate/up) served by one kernel call in a mixed decode step.

In a decode step of a mixed batch each LoRA projection pays a fixed cost besides its arithmetic: the staleness
check of its stacked weights, the kernel's row arguments, a ctypes call and an OpenMP region. Attention calls
q_proj, k_proj and v_proj on the same hidden-states tensor, and the MLP calls gate_proj and up_proj on one, so
the first of such siblings to run computes every sibling's base output and adds all their LoRA terms in ONE
call of the compiled kernel (its table of projections), and leaves the others' outputs in the forward's
`MixedBatch.stash`. A sibling takes its output from there only when it is called on that very tensor, unchanged
(same object, same version counter; inference tensors have none, so for them the object), in the same forward; otherwise it computes its own as before. So a model
that calls them differently (another order, other inputs, one of them not at all) gets the same outputs, at
worst after some wasted work.

Siblings are found by name under one parent (`SHARED_INPUT`), linked when an adapter is injected; only plain
nn.Linear bases with the same input size are linked. The group path is taken only where the kernel path would
be taken for each of them: float32, contiguous, no autograd, no DoRA adapter in their stacks.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

# Sibling names that model code calls on one input tensor (Llama/Mistral/Qwen/Gemma, BERT-style, Mixtral experts).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))


def link_shared_inputs(model: nn.Module, layer_type: type) -> None:
    """Set `_siblings` on every `layer_type` layer of `model` that has siblings reading the same input."""
    for parent in model.modules():
        children = parent._modules
        for names in SHARED_INPUT:
            members = tuple(children[n] for n in names
                            if isinstance(children.get(n), layer_type) and type(children[n].base_layer) is nn.Linear)
            if len(members) < 2 or len({m.in_features for m in members}) != 1:
                continue
            for m in members:
                m._siblings = members


def _version(x: torch.Tensor) -> Optional[int]:
    # Inference tensors (torch.inference_mode) keep no version counter: for them only the identity is checked.
    return None if x.is_inference() else x._version


def take(layer: Any, x: torch.Tensor, mixed: Any) -> Optional[torch.Tensor]:
    """`layer`'s output for x in this mixed forward: from the stash, or by running its whole sibling group
    through the kernel; None where the group path does not apply (the caller runs its own path)."""
    hit = mixed.stash.pop(layer, None)
    if hit is not None and hit[0] is x and hit[1] == _version(x):
        return hit[2]
    from peftray.ops import cpu_kernel, kernel_rows

    rows = kernel_rows(x, mixed.plan)
    if rows is None or (mixed.grad and x.requires_grad):
        return None
    members = [m for m in layer._siblings if m is layer or not (m.disabled or m.merged)]
    entries = []
    for m in members:
        st = m._stacked(mixed.order, torch.float32)
        if st.entry is None or st.dora:
            return None
        entries.append(st.entry)
    outputs = [m.base_layer(x) for m in members]
    if any(o.dtype is not torch.float32 or not o.is_contiguous() or (mixed.grad and o.requires_grad)
           for o in outputs):
        return None
    table = []
    for entry, out, m in zip(entries, outputs, members):
        table += [*entry, out.data_ptr(), m.out_features]
    cpu_kernel.run(mixed.kernel, x, table, rows)
    version = _version(x)
    mine = None
    for m, out in zip(members, outputs):
        if m is layer:
            mine = out
        else:
            mixed.stash[m] = (x, version, out)
    return mine
