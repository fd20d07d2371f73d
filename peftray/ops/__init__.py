"""Hot kernels shared by the tuners (mixed-adapter forward) and the serving engine. Imports torch only."""

from __future__ import annotations

from peftray.ops.lora import (
    kernel_rows, lora_delta, lora_delta_small_, new_stacked_b, small_batch_kernel, stack_lora_weights,
)
from peftray.ops.plan import RowPlan

__all__ = ["RowPlan", "kernel_rows", "lora_delta", "lora_delta_small_", "new_stacked_b", "small_batch_kernel",
           "stack_lora_weights"]
