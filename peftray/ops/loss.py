"""Causal-LM cross-entropy with the gradient made in the forward pass (`causal_lm_loss`).

transformers' `ForCausalLMLoss` runs `log_softmax` (one [tokens, vocab] tensor), `nll_loss` and, in backward,
a zero-filled [tokens, vocab] gradient plus `log_softmax_backward` (two more). For a 1024 x 4096 batch that is
three 16 MB tensors per step, and on the CPU, where torch has no caching allocator, each fresh one costs its
page faults: in the training benchmark the loss took ~60 ms of a ~390 ms step, far more than its arithmetic.

Here the forward writes softmax(logits) - onehot(labels) once (the loss's gradient up to one scale) and reads
each row's loss off it; backward only scales that buffer in place and hands it on. On the CPU the buffer is
kept for the next step when nothing else holds it any more, so its pages are touched once. Same value and
gradient as transformers' loss (the same shift, `ignore_index`, mean or `num_items_in_batch` reduction);
`logits` keep their ordinary autograd history, so a second loss on them still gets its gradient.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

# Rows whose target probability is below this are recomputed with log_softmax: -log(p) loses precision
# once p is subnormal (a loss above ~87 nats in fp32).
_TINY_PROB = 1e-30


class _BufferPool:
    """One reusable CPU buffer, handed out again while nothing else holds it, replaced otherwise.

    The pool keeps the buffer and hands out views of it; a view is a tensor of its own that shares the
    storage, so the storage's use count says whether any handed-out view (saved by autograd, passed on as a
    gradient, kept by a hook) is still alive. One buffer, not one per shape: it can be large (tokens x vocab),
    and a shape change (the last, shorter batch) costs one fresh allocation.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: Optional[torch.Tensor] = None
        self._free_uses = _storage_uses(torch.empty(1)) if _CAN_COUNT else None

    def get(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if self._free_uses is None:  # a torch without the use count: no reuse, still correct
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            buf = self._buffer
            if (buf is None or buf.shape != shape or buf.dtype != dtype
                    or _storage_uses(buf) != self._free_uses):
                buf = self._buffer = torch.empty(shape, dtype=dtype)
            return buf.view(buf.shape)

    def release(self) -> None:
        """Drop the kept buffer (its memory goes back once no gradient still uses it)."""
        with self._lock:
            self._buffer = None


_CAN_COUNT = hasattr(torch._C, "_storage_Use_Count")


def _storage_uses(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_POOL = _BufferPool()


def release_loss_buffer() -> None:
    """Free the [tokens, vocab] buffer the CPU loss keeps between steps (e.g. after training, in a notebook)."""
    _POOL.release()


class SoftmaxCrossEntropy(torch.autograd.Function):
    """sum over valid rows of -log softmax(x)[target] * scale, and its gradient, from one softmax pass."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                denominator: Optional[torch.Tensor]):
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        if logits.device.type == "cpu":
            probs = torch._softmax(logits, 1, False, out=_POOL.get(logits.shape, logits.dtype))
        else:  # CUDA & co. have caching allocators
            probs = torch.softmax(logits, 1)
        p_target = probs.gather(1, safe[:, None]).squeeze(1)
        losses = -torch.log(p_target)
        tiny = valid & (p_target < _TINY_PROB)
        if bool(tiny.any()):
            rows = tiny.nonzero().squeeze(1)
            exact = -torch.log_softmax(logits[rows], 1).gather(1, safe[rows, None]).squeeze(1)
            losses = losses.index_put((rows,), exact)
        total = torch.where(valid, losses, torch.zeros_like(losses)).sum()
        count = valid.sum()
        scale = 1.0 / (denominator if denominator is not None else count).to(probs.dtype)
        # The gradient: softmax minus one-hot on valid rows, zero on ignored ones.
        rows = torch.arange(probs.shape[0], device=probs.device)
        probs.index_put_((rows, safe), valid.to(probs.dtype).neg(), accumulate=True)
        ignored = (~valid).nonzero().squeeze(1)
        if ignored.numel():
            probs.index_fill_(0, ignored, 0.0)
        ctx.save_for_backward(probs, scale)  # freed after backward unless retain_graph: then the pool has it back
        ctx.applied = None  # the factor already multiplied into probs by an earlier backward
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        probs, scale = ctx.saved_tensors
        factor = grad_output * scale
        if probs.device.type != "cpu":
            return probs * factor, None, None, None
        f = float(factor)
        if ctx.applied is None and f != 0.0 and torch.isfinite(factor):
            ctx.applied = f  # scale in place once: the common single backward allocates nothing
            return _alias(probs).mul_(f), None, None, None
        if ctx.applied is None:
            return probs * f, None, None, None
        return probs * (f / ctx.applied), None, None, None  # retain_graph: undo the first factor


def _alias(t: torch.Tensor) -> torch.Tensor:
    """The same memory under a tensor with its own version counter. Scaling the saved buffer in place through
    it keeps autograd's saved-tensor check quiet on purpose: a later backward (retain_graph) divides the
    factor back out (`ctx.applied`), so the saved value is still known exactly."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(),
                                                                t.size(), t.stride())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch: Optional[torch.Tensor] = None, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """Drop-in for transformers' `ForCausalLMLoss` (same arguments, same value and gradient)."""
    logits = logits.float()
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    flat = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(flat.device)
    if not (torch.is_grad_enabled() and flat.requires_grad):
        # No backward to prepare for: plain cross-entropy is the cheaper forward.
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = torch.nn.functional.cross_entropy(flat, targets, ignore_index=ignore_index, reduction=reduction)
        return loss / _as_tensor(num_items_in_batch, loss) if num_items_in_batch is not None else loss
    if targets.numel() and int(targets.max()) >= vocab_size:
        raise IndexError(f"label {int(targets.max())} is out of range for a vocabulary of {vocab_size} tokens")
    denominator = _as_tensor(num_items_in_batch, flat) if num_items_in_batch is not None else None
    return SoftmaxCrossEntropy.apply(flat.contiguous(), targets, ignore_index, denominator)


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    return value.to(like.device) if torch.is_tensor(value) else torch.tensor(float(value), device=like.device)
