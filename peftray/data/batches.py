"""Which rows each worker trains on at each step, and how they become padded tensors.

The order is a function of (seed, epoch, step) only, so a worker that restarts from a checkpoint at step s
sees exactly the rows it would have seen, and N workers with batch b see, together, the same rows per step
as one worker with batch N*b (rank r takes the r-th slice of each global batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftray.data.formats import IGNORE
from peftray.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """Global batch geometry: micro-batches per optimizer step, rows per micro-batch per worker."""

    num_rows: int
    batch_size: int
    world_size: int
    accumulation: int
    seed: int

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.world_size * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.rows_per_step

    def check(self) -> None:
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {self.num_rows} training examples, fewer than one optimizer step needs "
                f"(training.batch_size {self.batch_size} x resources.num_workers {self.world_size} x "
                f"training.gradient_accumulation_steps {self.accumulation} = {self.rows_per_step}); "
                "lower the batch size or add rows")

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Row indices for `rank` at optimizer step `step` (0-based), one list per micro-batch."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_rows, generator=gen).tolist()
        start = offset * self.rows_per_step
        out = []
        for micro in range(self.accumulation):
            base = start + micro * self.batch_size * self.world_size + rank * self.batch_size
            out.append(order[base:base + self.batch_size])
        return out


def total_steps(plan: BatchPlan, epochs: int | None, max_steps: int | None) -> int:
    """Optimizer steps in the run: `max_steps`, else epochs x steps per epoch (one epoch by default)."""
    return max_steps or (epochs or 1) * plan.steps_per_epoch


def collate(examples: list[dict[str, Any]], pad_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions get attention 0 and label -100.

    Images (image_classification) are stacked: `{"pixel_values": [B, 3, H, W], "labels": [B]}`.
    """
    if "pixel_values" in examples[0]:
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    return batch


def eval_batches(examples: list[dict[str, Any]], batch_size: int, rank: int, world: int):
    """This rank's strided share of the eval examples, in order, as lists of examples."""
    mine = examples[rank::world]
    for i in range(0, len(mine), batch_size):
        yield mine[i:i + batch_size]
