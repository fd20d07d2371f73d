"""Mixed-adapter batches: which adapter each row of the batch uses, set once per forward/generate call.

`PeftModel` enters `mixed_batch(...)` around the model call; every LoRA layer reads the same `MixedBatch`
(the row plan is built once and shared, not rebuilt per layer), and so does every `modules_to_save` wrapper
(a classifier head per adapter: each row goes through its own adapter's copy). A context variable keeps
concurrent calls (threads, asyncio tasks) apart.
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
    """Adapter slot per row (-1 = base model), the slot order, and the kernel's row plan."""

    order: tuple[str, ...]
    indices: torch.Tensor  # LongTensor[B]
    plan: Any  # peftray.ops.RowPlan


_CURRENT: contextvars.ContextVar[Optional[MixedBatch]] = contextvars.ContextVar("peftray_mixed_batch", default=None)


def current_mixed_batch() -> Optional[MixedBatch]:
    return _CURRENT.get()


def build_mixed_batch(adapter_names: list[str], order: tuple[str, ...], device: torch.device) -> MixedBatch:
    """Map per-row adapter names to slots of `order`; ConfigError for names that are not loaded."""
    from peftray.ops import RowPlan  # the kernel package (torch only)

    slot = {name: i for i, name in enumerate(order)}
    unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in slot})
    if unknown:
        raise ConfigError(f"`adapter_names` has adapters that are not loaded: {unknown}; loaded: {list(order)} "
                          f"(use {BASE_ADAPTER!r} for the base model).")
    idx = torch.tensor([slot.get(n, -1) for n in adapter_names], dtype=torch.long, device=device)
    return MixedBatch(order=order, indices=idx, plan=RowPlan.from_indices(idx))


@contextlib.contextmanager
def mixed_batch(batch: Optional[MixedBatch]) -> Iterator[None]:
    token = _CURRENT.set(batch)
    try:
        yield
    finally:
        _CURRENT.reset(token)
