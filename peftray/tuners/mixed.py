"""Mixed-adapter batches: which adapter each row of the batch uses, set once per forward/generate call.

`PeftModel` enters `mixed_batch(...)` around the model call; every LoRA layer reads the same `MixedBatch`
(the row plan is built once and shared, not rebuilt per layer; a decode loop that sends the same adapter names
step after step reuses the previous step's plan), and so does every `modules_to_save` wrapper (a classifier
head per adapter: each row goes through its own adapter's copy). A context variable keeps concurrent calls
(threads, asyncio tasks) apart.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from peftray.errors import ConfigError

BASE_ADAPTER = "__base__"


@dataclass(frozen=True)
class MixedBatch:
    """Adapter slot per row (-1 = base model), the slot order, the kernel's row plan, and what the layers
    would otherwise each ask again: the compiled CPU kernel, when it may serve this forward, and whether autograd
    was recording when the forward began."""

    order: tuple[str, ...]
    indices: torch.Tensor  # LongTensor[B]
    plan: Any  # peftray.ops.RowPlan
    names: tuple[str, ...] = ()  # the adapter name of each row, as given
    kernel: Any = None  # see peftray.ops.small_batch_kernel
    grad: bool = True


_CURRENT: contextvars.ContextVar[Optional[MixedBatch]] = contextvars.ContextVar("peftray_mixed_batch", default=None)


def current_mixed_batch() -> Optional[MixedBatch]:
    return _CURRENT.get()


def build_mixed_batch(adapter_names: list[str], order: tuple[str, ...], device: torch.device,
                      previous: Optional[MixedBatch] = None) -> MixedBatch:
    """Map per-row adapter names to slots of `order`; ConfigError for names that are not loaded.

    `previous`: the last forward's batch; its slots and plan are reused when the names, the order and the
    device are the same (consecutive decode steps of the same rows).
    """
    from peftray.ops import RowPlan, small_batch_kernel  # the kernel package (torch only)

    names = tuple(adapter_names)
    if previous is not None and previous.names == names and previous.order == order \
            and previous.indices.device == device:
        idx, plan = previous.indices, previous.plan
    else:
        slot = {name: i for i, name in enumerate(order)}
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in slot})
        if unknown:
            raise ConfigError(f"`adapter_names` has adapters that are not loaded: {unknown}; loaded: {list(order)} "
                              f"(use {BASE_ADAPTER!r} for the base model).")
        idx = torch.tensor([slot.get(n, -1) for n in names], dtype=torch.long, device=device)
        plan = RowPlan.from_indices(idx)
    return MixedBatch(order=order, indices=idx, plan=plan, names=names, kernel=small_batch_kernel(),
                      grad=torch.is_grad_enabled())


@contextlib.contextmanager
def mixed_batch(batch: Optional[MixedBatch]) -> Iterator[None]:
    token = _CURRENT.set(batch)
    try:
        yield
    finally:
        _CURRENT.reset(token)


_FIXED: contextvars.ContextVar[Optional[object]] = contextvars.ContextVar("peftray_fixed_adapter_weights",
                                                                          default=None)


@contextlib.contextmanager
def fixed_adapter_weights(scope: Optional[object] = None) -> Iterator[object]:
    """Within this block (and every later block given the same `scope` object), adapter weights change only by
    adding, loading or deleting adapters: each layer's stack is checked once per scope, not on every call. A new
    scope (the default) checks everything again once; replace the scope after changing weights any other way."""
    scope = object() if scope is None else scope
    token = _FIXED.set(scope)
    try:
        yield scope
    finally:
        _FIXED.reset(token)
