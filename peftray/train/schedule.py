"""Optimizer and learning-rate schedule for the adapter parameters."""

from __future__ import annotations

import math

import torch

from peftray.jobspec import TrainingSpec


def make_optimizer(model: torch.nn.Module, t: TrainingSpec) -> torch.optim.Optimizer:
    """AdamW over the trainable (adapter) parameters; no weight decay on biases and 1-d vectors."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates all adapter tensors in one call (~5x faster than the per-tensor loop on the CPU
    # for a LoRA on every projection); torch has it for CPU and CUDA tensors only.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.learning_rate, fused=fused or None)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base learning rate at `step` (0-based): linear warmup, then constant/linear/cosine."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, t: TrainingSpec, total: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, t.warmup_steps, t.lr_scheduler))
