"""Preference losses, written out: DPO (sigmoid, IPO, hinge) and ORPO, on sequence log-probabilities.

A batch of n pairs is one forward pass over 2n rows, the n prompt+chosen rows first, then the n
prompt+rejected rows (TRL's layout), right-padded; `completion_mask` marks the completion tokens.
Every function returns per-pair values; the loop decides how they are averaged over workers.

Formulas as in TRL 1.16 (`DPOTrainer._compute_loss`, `ORPOTrainer.odds_ratio_loss`), which the tests use
as the reference:
- DPO: d = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)); sigmoid: -log sigma(beta d), with label
  smoothing eps: -(1-eps) log sigma(beta d) - eps log sigma(-beta d) (conservative DPO; eps = 0 is TRL's);
  ipo: (d_c/|c| - d_r/|r| - 1/(2 beta))^2 with per-sequence lengths; hinge: relu(1 - beta d).
- ORPO: the chosen rows' token-mean NLL over prompt + completion, minus beta * mean log sigma(log odds),
  log odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)) with a = the completion's mean token log-prob.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """[chosen rows; rejected rows] right-padded, with attention and completion masks (and precomputed
    reference log-probs when the examples carry them)."""
    seqs = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + [e["prompt_ids"] + e["rejected_ids"]
                                                                    for e in examples]
    prompt_lens = [len(e["prompt_ids"]) for e in examples] * 2
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        completion[i, p:len(seq)] = 1
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    if "ref_chosen_logps" in examples[0]:
        batch["ref_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples]
                                          + [e["ref_rejected_logps"] for e in examples], dtype=torch.float32)
    return batch


def token_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..L-1 of every row, shape [rows, L-1], in fp32."""
    ids = batch["input_ids"]
    out = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False)
    # prompt tuning and P-tuning put virtual tokens in front: the last L positions are the real ones
    logits = out.logits[:, -ids.shape[1]:-1].float()
    picked = logits.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return picked - logits.logsumexp(-1)


def completion_logps(per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-prob of each row's completion tokens, shape [rows]."""
    return (per_token * batch["completion_mask"][:, 1:]).sum(-1)


def dpo_losses(logps: torch.Tensor, ref_logps: torch.Tensor, completion_mask: torch.Tensor, beta: float,
               loss_type: str, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the [2n] implicit rewards beta * (log pi - log ref).

    Args:
        logps, ref_logps: summed completion log-probs of [chosen; rejected] rows, shape [2n].
        completion_mask: the batch's [2n, L] completion mask (IPO normalises by completion length).
    """
    ratios = logps - ref_logps
    chosen, rejected = ratios.chunk(2)
    delta = chosen - rejected
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        lengths = completion_mask.sum(-1).clamp(min=1).to(ratios.dtype)
        chosen_len, rejected_len = lengths.chunk(2)
        losses = (chosen / chosen_len - rejected / rejected_len - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected sigmoid, ipo or hinge")
    return losses, beta * ratios.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation near 0 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_terms(per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ORPO's pieces: the chosen rows' NLL token sum and count, per-pair log sigma(log odds), mean logps."""
    attention = batch["attention_mask"][:, 1:].to(per_token.dtype)
    completion = batch["completion_mask"][:, 1:].to(per_token.dtype)
    n = per_token.shape[0] // 2
    nll_sum = -(per_token[:n] * attention[:n]).sum()
    mean_logps = (per_token * completion).sum(-1) / completion.sum(-1).clamp(min=1)
    chosen, rejected = mean_logps.chunk(2)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return {"nll_sum": nll_sum, "nll_tokens": attention[:n].sum(), "ratio": F.logsigmoid(log_odds),
            "log_odds": log_odds.detach(), "mean_logps": mean_logps}


def reward_sums(rewards: torch.Tensor, logps: torch.Tensor) -> dict[str, float]:
    """Additive sums over this batch's pairs of the logged reward statistics (divide by pairs for means)."""
    chosen, rejected = rewards.detach().chunk(2)
    lp_chosen, lp_rejected = logps.detach().chunk(2)
    return {"rewards/chosen": float(chosen.sum()), "rewards/rejected": float(rejected.sum()),
            "rewards/accuracies": float((chosen > rejected).float().sum()),
            "rewards/margins": float((chosen - rejected).sum()),
            "logps/chosen": float(lp_chosen.sum()), "logps/rejected": float(lp_rejected.sum())}


@torch.no_grad()
def reference_logps(model, examples: list[dict], batch_size: int, pad_id: int, device, rank: int = 0,
                    world: int = 1) -> torch.Tensor:
    """The reference (adapter switched off) summed completion log-probs of every example, shape [N, 2]
    (chosen, rejected). Rank r fills its strided chunks; the caller sums the tables over ranks."""
    table = torch.zeros(len(examples), 2, dtype=torch.float64)
    with model.disable_adapter():
        for start in range(rank * batch_size, len(examples), world * batch_size):
            chunk = examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
            logps = completion_logps(token_logps(model, batch), batch).double().cpu()
            table[start:start + len(chunk)] = torch.stack(logps.chunk(2), dim=1)
    return table
