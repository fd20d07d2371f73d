"""THE table of training objectives: name -> batch collation, loss, metrics.

The loop knows nothing of any objective: it collates micro-batches with `collate`, sums `counts` over
all micro-batches and workers (what the loss is an average over), calls `loss` on each micro-batch and
back-propagates the scaled value, adds up the returned sums over workers and turns them into logged
metrics with `metrics`. Because each rank scales its sums by world_size / (global count), N workers
with batch b take exactly the step of one worker with batch N*b, after DDP's gradient average.

    sft    demonstrations: token-mean cross-entropy (classification: row-mean)
    dpo    preference pairs against a frozen reference (the base, adapter switched off)
    orpo   preference pairs, no reference: NLL on the chosen rows + odds-ratio term

The job spec's `training.objective` choices are this table's keys (tests/train/test_objectives.py keeps
them equal; the spec cannot import this module: train sits above jobspec).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from peftray.data import collate
from peftray.train import diffusion, preference
from peftray.tuners.tasks import TASKS


@dataclass
class Step:
    """What one micro-batch's loss needs: the model to differentiate through (DDP-wrapped or not), the
    PeftModel itself (for the reference), the batch on its device, the global counts, the world size."""

    model: torch.nn.Module
    peft: torch.nn.Module
    batch: dict[str, torch.Tensor]
    counts: dict[str, float]
    world: int
    spec: Any  # JobSpec


@dataclass(frozen=True)
class Objective:
    name: str
    collate: Callable[[list[dict], int], dict[str, torch.Tensor]]
    counts: Callable[[dict[str, torch.Tensor], Any], dict[str, float]]
    loss: Callable[[Step], tuple[torch.Tensor, dict[str, float]]]  # (scaled loss to backward, additive sums)
    metrics: Callable[[dict[str, float], dict[str, float], Any, bool], dict[str, float]]  # sums, counts, spec, eval


def _share(value: torch.Tensor, step: Step, key: str) -> torch.Tensor:
    """This rank's part of a global mean: local sum x world / global count."""
    return value * step.world / max(step.counts[key], 1)


# ---- sft --------------------------------------------------------------------------------------------------
def _sft_counts(batch: dict[str, torch.Tensor], spec) -> dict[str, float]:
    if TASKS[spec.task].classification:
        return {"targets": float(batch["labels"].numel())}
    return {"targets": float((batch["labels"][:, 1:] != -100).sum())}  # causal LM: the shifted labels that count


def _sft_loss(step: Step) -> tuple[torch.Tensor, dict[str, float]]:
    out = step.model(**step.batch)
    token_sum = out.loss.float() * _sft_counts(step.batch, step.spec)["targets"]
    sums = {"loss": float(token_sum.detach())}
    if TASKS[step.spec.task].classification:
        sums["correct"] = float((out.logits.argmax(-1) == step.batch["labels"]).sum())
    return _share(token_sum, step, "targets"), sums


def _sft_metrics(sums: dict[str, float], counts: dict[str, float], spec, evaluating: bool) -> dict[str, float]:
    loss = sums["loss"] / max(counts["targets"], 1)
    if not evaluating:
        return {"loss": loss}
    if "correct" in sums:
        return {"loss": loss, "accuracy": sums["correct"] / max(counts["targets"], 1)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# ---- dpo and orpo -----------------------------------------------------------------------------------------
def _pair_counts(batch: dict[str, torch.Tensor], spec) -> dict[str, float]:
    counts = {"pairs": float(batch["input_ids"].shape[0] // 2)}
    if spec.training.objective == "orpo":
        n = batch["input_ids"].shape[0] // 2
        counts["nll_tokens"] = float(batch["attention_mask"][:n, 1:].sum())
    return counts


def _reference(step: Step) -> torch.Tensor:
    if "ref_logps" in step.batch:  # precomputed once before training
        return step.batch["ref_logps"]
    with torch.no_grad(), step.peft.disable_adapter():
        return preference.completion_logps(preference.token_logps(step.peft, step.batch), step.batch)


def _dpo_loss(step: Step) -> tuple[torch.Tensor, dict[str, float]]:
    t = step.spec.training
    per_token = preference.token_logps(step.model, step.batch)
    logps = preference.completion_logps(per_token, step.batch)
    losses, rewards = preference.dpo_losses(logps, _reference(step), step.batch["completion_mask"],
                                            t.preference_beta, t.loss_type, t.label_smoothing)
    sums = {"loss": float(losses.detach().sum()), **preference.reward_sums(rewards, logps)}
    return _share(losses.sum(), step, "pairs"), sums


def _orpo_loss(step: Step) -> tuple[torch.Tensor, dict[str, float]]:
    beta = step.spec.training.preference_beta
    terms = preference.orpo_terms(preference.token_logps(step.model, step.batch), step.batch)
    scaled = _share(terms["nll_sum"], step, "nll_tokens") - beta * _share(terms["ratio"].sum(), step, "pairs")
    sums = {"nll_sum": float(terms["nll_sum"].detach()), "ratio": float(terms["ratio"].detach().sum()),
            "log_odds": float(terms["log_odds"].sum()),
            **preference.reward_sums(beta * terms["mean_logps"], terms["mean_logps"])}
    return scaled, sums


def _pair_metrics(sums: dict[str, float], counts: dict[str, float], spec, evaluating: bool) -> dict[str, float]:
    pairs = max(counts["pairs"], 1)
    out = {k: sums[k] / pairs for k in sums if "/" in k}  # rewards/..., logps/...: means over pairs
    if spec.training.objective == "orpo":
        nll = sums["nll_sum"] / max(counts["nll_tokens"], 1)
        out.update(loss=nll - spec.training.preference_beta * sums["ratio"] / pairs, nll_loss=nll,
                   log_odds_ratio=sums["ratio"] / pairs, log_odds_chosen=sums["log_odds"] / pairs)
    else:
        out["loss"] = sums["loss"] / pairs
    return out


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective("sft", collate, _sft_counts, _sft_loss, _sft_metrics),
    "dpo": Objective("dpo", preference.collate_pairs, _pair_counts, _dpo_loss, _pair_metrics),
    "orpo": Objective("orpo", preference.collate_pairs, _pair_counts, _orpo_loss, _pair_metrics),
}


# text_to_image's noise-prediction loss: chosen by the task, not by `training.objective` (which stays sft)
DIFFUSION = Objective("diffusion", diffusion.collate, diffusion.counts, diffusion.loss, diffusion.metrics)


def objective_of(spec) -> Objective:
    """The table's entry for `spec.training.objective` (the diffusion loss for a diffusion task)."""
    return DIFFUSION if TASKS[spec.task].diffusion else OBJECTIVES[spec.training.objective]


def needs_reference_table(spec) -> bool:
    return spec.training.objective == "dpo" and spec.training.reference == "precomputed"

