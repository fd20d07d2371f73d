"""RowPlan: which LoRA adapter each row of a batch uses, laid out once per forward for every layer's kernel.

A mixed-adapter batch runs the base projection once for all rows, then adds each row's low-rank term. The
kernel wants the rows grouped by adapter, so the plan sorts them once (on the host: B is small, and one
host read per forward beats one per layer) and keeps the index tensors both kernel paths need:

- the *padded grouped* layout: U used adapters x k rows each (k = the largest group; short groups repeat
  their first row, whose output is dropped), so one `bmm` per factor reads each adapter's weights once;
- the *segment* layout: active rows sorted by adapter, contiguous segments, one matmul pair per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

KERNEL_SEGMENT = 8  # rows per run of the compiled CPU kernel (MAX_SEG in ops/_lora_rows.c)


@dataclass(frozen=True, eq=False)
class RowPlan:
    """Per-row adapter slots of a batch (-1 = base model, no adapter), grouped by slot.

    Build it with `RowPlan.from_indices` once per forward and pass the same plan to every layer.

    Attributes:
        batch_size: B, the number of rows.
        slots: the adapter slot per row, as given (host list).
        used: the slots in use, ascending (host list).
        counts: rows per used slot (host list, same order as `used`).
        group: k, the largest count (rows per group in the padded layout).
        n_active: rows that use an adapter.
        identity: rows are already grouped, all active and all groups full, so no gather is needed.
        used_range: (lo, hi) when `used` is the contiguous range lo..hi-1 (weights are sliced, not gathered).
        active_rows: LongTensor[n_active], the active rows sorted by slot (stable).
        pad_gather: LongTensor[U * k], the source row of each padded position.
        pad_valid: LongTensor[n_active], the padded position of each row of `active_rows`; None when no padding.
        row_to_pad: LongTensor[B], the padded position of each row (only meaningful when all rows are active).
        used_index: LongTensor[U], `used` on the device.
    """

    batch_size: int
    slots: tuple[int, ...]
    used: tuple[int, ...]
    counts: tuple[int, ...]
    group: int
    n_active: int
    identity: bool
    used_range: Optional[tuple[int, int]]
    active_rows: torch.Tensor
    pad_gather: torch.Tensor
    pad_valid: Optional[torch.Tensor]
    row_to_pad: torch.Tensor
    used_index: torch.Tensor
    _copies: dict = field(default_factory=dict, repr=False)  # device -> the same plan there (see `on`)
    _segments: dict = field(default_factory=dict, repr=False)  # tokens per row -> see kernel_segments
    _args: dict = field(default_factory=dict, repr=False)  # tokens per row -> see kernel_args

    @classmethod
    def from_indices(cls, idx: Union[torch.Tensor, Sequence[int]],
                     device: Optional[Union[str, torch.device]] = None) -> "RowPlan":
        """Plan a batch from the adapter slot of each row.

        Args:
            idx: LongTensor[B] or list of ints: the adapter slot of each row, -1 for the base model.
            device: where the plan's index tensors live; default: idx's device (CPU for a list).

        Returns:
            The plan, reusable by every layer of the forward.

        Raises:
            ValueError: idx is not one-dimensional or holds a value below -1.
        """
        if isinstance(idx, torch.Tensor):
            if idx.dim() != 1:
                raise ValueError(f"RowPlan.from_indices: idx must be 1-D (one slot per row), got shape "
                                 f"{tuple(idx.shape)}")
            device = idx.device if device is None else device
            slots = [int(s) for s in idx.tolist()]  # the one host read of the forward
        else:
            slots = [int(s) for s in idx]
        bad = [s for s in slots if s < -1]
        if bad:
            raise ValueError(f"RowPlan.from_indices: slots must be >= -1 (-1 = base model), got {bad[:5]}")
        return cls._build(slots, torch.device("cpu") if device is None else torch.device(device))

    @classmethod
    def _build(cls, slots: list[int], device: torch.device) -> "RowPlan":
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot >= 0:
                groups.setdefault(slot, []).append(row)
        used = sorted(groups)
        counts = [len(groups[s]) for s in used]
        k = max(counts, default=0)
        active, pad_gather, pad_valid = [], [], []
        row_to_pad = [0] * len(slots)
        for j, slot in enumerate(used):
            rows = groups[slot]
            for i, row in enumerate(rows):
                row_to_pad[row] = j * k + i
                pad_valid.append(j * k + i)
            active.extend(rows)
            pad_gather.extend(rows + [rows[0]] * (k - len(rows)))  # filler rows: computed, then dropped
        padded = len(pad_gather) != len(active)
        contiguous = bool(used) and used == list(range(used[0], used[-1] + 1))

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            batch_size=len(slots), slots=tuple(slots), used=tuple(used), counts=tuple(counts), group=k,
            n_active=len(active), identity=pad_gather == list(range(len(slots))),
            used_range=(used[0], used[-1] + 1) if contiguous else None,
            active_rows=tensor(active), pad_gather=tensor(pad_gather),
            pad_valid=tensor(pad_valid) if padded else None, row_to_pad=tensor(row_to_pad),
            used_index=tensor(used),
        )

    @property
    def all_active(self) -> bool:
        """True when no row is a base-model row."""
        return self.n_active == self.batch_size

    @property
    def padding(self) -> float:
        """Padded rows / active rows (1.0 = no filler rows); inf for an all-base batch."""
        return len(self.used) * self.group / self.n_active if self.n_active else float("inf")

    def kernel_segments(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The compiled CPU kernel's row layout for a [B * tokens, ...] view: active token rows sorted by slot,
        cut into runs of one slot of at most KERNEL_SEGMENT rows (so one adapter's rows still spread over the
        threads), as (rows, run starts + end, run slots), int64 on the CPU; made once per plan and token count,
        since every layer of a forward asks for the same."""
        if tokens not in self._segments:
            rows, starts, seg_slots = [], [], []
            for slot in self.used:
                token_rows = [row * tokens + t for row in range(self.batch_size) if self.slots[row] == slot
                              for t in range(tokens)]
                for i in range(0, len(token_rows), KERNEL_SEGMENT):
                    starts.append(len(rows))
                    seg_slots.append(slot)
                    rows.extend(token_rows[i:i + KERNEL_SEGMENT])
            starts.append(len(rows))
            self._segments[tokens] = tuple(torch.tensor(v, dtype=torch.long) for v in (rows, starts, seg_slots))
        return self._segments[tokens]

    def kernel_args(self, tokens: int) -> tuple[int, int, int, int]:
        """`kernel_segments(tokens)` as the C kernel takes them: the three tensors' addresses and the number of
        runs (the tensors stay alive in this plan); looked up by every LoRA layer of a decode step."""
        args = self._args.get(tokens)
        if args is None:
            rows, starts, seg_slots = self.kernel_segments(tokens)
            args = self._args[tokens] = (rows.data_ptr(), starts.data_ptr(), seg_slots.data_ptr(), seg_slots.numel())
        return args

    def to(self, device: Union[str, torch.device]) -> "RowPlan":
        """The same plan with its index tensors on `device`."""
        return RowPlan._build(list(self.slots), torch.device(device))

    def on(self, device: torch.device) -> "RowPlan":
        """This plan if its tensors are on `device`, else a copy there, made once and kept (layers of one
        forward may sit on different devices when a model is split)."""
        if self.active_rows.device == device:
            return self
        if device not in self._copies:
            self._copies[device] = self.to(device)
        return self._copies[device]
