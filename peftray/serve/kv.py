"""The running batch's KV cache: rows of different lengths, left-padded, joined and dropped between steps.

Every layer keeps keys/values as [rows, kv_heads, T, head_dim]; a row shorter than T is padded on the left
and its padding is masked out (attention mask 0). A new request is prefilled on its own (or with other new
requests), then its cache is padded to the batch's T (or the batch to its own) and concatenated along the
row axis; a finished row is dropped with an index select, and columns that became padding for every row
are trimmed so T does not grow without bound. Positions come from the mask (real tokens before each one),
so a row's result does not depend on which other rows share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import DynamicCache


@dataclass
class BatchKV:
    """Per-layer (keys, values) of the running rows, plus the [rows, T] attention mask."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor  # LongTensor [rows, T]

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @classmethod
    def from_cache(cls, cache: DynamicCache, mask: torch.Tensor) -> "BatchKV":
        return cls([(layer.keys, layer.values) for layer in cache.layers], mask)

    def to_cache(self) -> DynamicCache:
        """A fresh DynamicCache over these tensors (the model appends the step's keys/values to it)."""
        return DynamicCache([(k, v) for k, v in self.layers])

    def positions(self, new_tokens: int) -> torch.Tensor:
        """Position ids [rows, new_tokens] of the next tokens: each row counts only its real tokens."""
        start = self.mask.sum(dim=1, keepdim=True)
        return start + torch.arange(new_tokens, device=self.mask.device).unsqueeze(0)

    def extended_mask(self, new_tokens: int) -> torch.Tensor:
        ones = torch.ones(self.rows, new_tokens, dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def concat(a: Optional[BatchKV], b: BatchKV) -> BatchKV:
    """Rows of `a` then rows of `b`, both left-padded to the longer length."""
    if a is None or a.rows == 0:
        return b
    t = max(a.length, b.length)
    pa, pb = t - a.length, t - b.length
    layers = [(torch.cat([_pad_left(ka, pa, 2), _pad_left(kb, pb, 2)]),
               torch.cat([_pad_left(va, pa, 2), _pad_left(vb, pb, 2)]))
              for (ka, va), (kb, vb) in zip(a.layers, b.layers)]
    return BatchKV(layers, torch.cat([_pad_left(a.mask, pa, 1), _pad_left(b.mask, pb, 1)]))


def select(kv: BatchKV, keep: list[int]) -> Optional[BatchKV]:
    """Only the rows `keep` (in that order); leading all-padding columns are cut. None when no row is left."""
    if not keep:
        return None
    idx = torch.tensor(keep, dtype=torch.long, device=kv.mask.device)
    mask = kv.mask.index_select(0, idx)
    real = mask.any(dim=0).nonzero()
    cut = int(real[0]) if real.numel() else 0
    layers = [(k.index_select(0, idx)[:, :, cut:], v.index_select(0, idx)[:, :, cut:]) for k, v in kv.layers]
    return BatchKV(layers, mask[:, cut:])


def left_pad_ids(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, T] token ids left-padded with pad_id, and their 0/1 mask."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), t), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        if s:
            ids[i, t - len(s):] = torch.tensor(s, dtype=torch.long, device=device)
            mask[i, t - len(s):] = 1
    return ids, mask


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> int:
    """One token from one row's logits: greedy at temperature 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # smallest set whose mass reaches top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
