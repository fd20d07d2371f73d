"""Autocast handling for peftray's own autograd functions and in-place kernels.

`torch.autocast` (what Trainer's `bf16=True`, Accelerate's `mixed_precision="bf16"` and TRL run under) casts the
inputs of out-of-place matmuls but not of in-place ones (`addmm_`) nor of a custom `autograd.Function`'s saved
tensors, so a kernel mixing both sees bf16 and fp32 operands. The kernels therefore take their operands already
in the autocast dtype and run with autocast off: the same lower-precision matmuls autocast would have run.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls in on `x`'s device, or None when autocast is off there."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


@contextlib.contextmanager
def autocast_off(x: torch.Tensor) -> Iterator[None]:
    with torch.autocast(x.device.type, enabled=False):
        yield


def cast_all(dtype: torch.dtype, *tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """Each tensor in `dtype` (differentiable: gradients flow back in the tensor's own dtype); None stays None."""
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)
