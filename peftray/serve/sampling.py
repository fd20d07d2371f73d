"""Per-row logit processing of OpenAI's sampling fields: penalties and logprobs (the grammar mask is in grammar.py)."""

from __future__ import annotations

import torch


def penalize(logits: torch.Tensor, out_ids: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties over the tokens generated so far: logit[j] -= count[j] * frequency + (count[j] > 0) * presence."""
    if not out_ids or (presence == 0.0 and frequency == 0.0):
        return logits
    ids = torch.tensor(out_ids, dtype=torch.long, device=logits.device)
    counts = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device).scatter_add_(
        0, ids, torch.ones_like(ids, dtype=logits.dtype))
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> dict:
    """The chosen token's log-probability under the model (its raw logits) and the `top` most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    out: dict = {"id": token, "logprob": float(lp[token]), "top": []}
    if top > 0:
        values, ids = torch.topk(lp, min(top, lp.shape[-1]))
        out["top"] = [(int(i), float(v)) for i, v in zip(ids, values)]
    return out

