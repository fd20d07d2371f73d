"""The mixed-adapter LoRA kernel: every row's own low-rank term, for all rows of a batch at once.

delta[row] = scaling[s] * (x[row] @ a[s].T) @ b[s].T with s = the row's adapter slot (0 for base rows).

Two paths, both without a Python loop over rows:
- grouped `bmm` (the default): rows gathered into U groups of k (one per used adapter), two batched matmuls
  that read each adapter's A and B once. Best when groups are about even: decode steps and most prefills.
- segments: one matmul pair per used adapter over its contiguous run of sorted rows. Chosen for big inputs
  whose groups are so uneven that padding to the largest group would waste more than it saves.
A third path serves small float32 batches on the CPU without autograd (decode steps): the compiled kernel of
`peftray.ops.cpu_kernel`, one call per projection instead of ~6 dispatches, adding into the base output.
The scaling multiplies the small [tokens, r] intermediate, never the [tokens, out] product.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from peftray.ops import cpu_kernel
from peftray.ops.plan import RowPlan

# Segments pay ~2 small-op dispatches per adapter; use them only when padding wastes over half the work
# and there is enough work per adapter for those dispatches not to matter.
_SEGMENT_MIN_TOKENS = 2048
_SEGMENT_MIN_PADDING = 1.5
# The compiled row kernel wins while per-call dispatch dominates; past this many token rows bmm's GEMMs do.
_KERNEL_MAX_TOKEN_ROWS = 128


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor, plan: RowPlan,
               *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The LoRA term of each row of a mixed-adapter batch.

    Args:
        x: [B, ..., in] input (2-D [B, in] or 3-D [B, T, in] and more).
        a: [N, r_max, in] stacked lora_A weights, zero-padded to the largest rank (see `stack_lora_weights`).
        b: [N, out, r_max] stacked lora_B weights, zero-padded the same way.
        scaling: [N] per-adapter scale (alpha / r, or alpha / sqrt(r) with rsLoRA).
        plan: the batch's `RowPlan` (slot per row, -1 = base model).
        out: optional [B, ..., out] tensor (typically the base layer's output) to add the term into; in place
            unless autograd needs the old value, so always use the returned tensor.

    Returns:
        [B, ..., out]: the LoRA term (0 for base rows), or `out` plus it when `out` is given.

    Raises:
        ValueError: shapes that do not fit together, or a slot >= N.
    """
    _check(x, a, b, scaling, plan, out)
    plan = plan.on(x.device)
    bsz, n_in = x.shape[0], x.shape[-1]
    lead, n_out = x.shape[:-1], b.shape[1]
    tokens = math.prod(x.shape[1:-1])  # tokens per row (1 for 2-D x)
    if plan.n_active == 0:
        return out if out is not None else x.new_zeros(*lead, n_out)
    if out is not None and plan.n_active * tokens <= _KERNEL_MAX_TOKEN_ROWS:
        done = _kernel_into(out, x, a, b, scaling, plan)
        if done is not None:
            return done
    x3 = x.reshape(bsz, tokens, n_in)
    if plan.n_active * tokens >= _SEGMENT_MIN_TOKENS and plan.padding > _SEGMENT_MIN_PADDING:
        y, layout = _segments(x3, a, b, scaling, plan), "active"
    elif out is not None and plan.identity and _writable(out, x):
        return _grouped_into(out, x3, a, b, scaling, plan)
    else:
        y, layout = _grouped(x3, a, b, scaling, plan), "padded"
    if out is None:
        return _scatter(y, layout, plan).view(*lead, n_out)
    return _accumulate(out, y, layout, plan)


def _check(x, a, b, scaling, plan: RowPlan, out) -> None:
    if x.dim() < 2 or a.dim() != 3 or b.dim() != 3 or scaling.dim() != 1:
        raise ValueError(f"lora_delta: expected x [B, ..., in], a [N, r, in], b [N, out, r], scaling [N]; got x "
                         f"{tuple(x.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}, scaling {tuple(scaling.shape)}")
    n, r, n_in = a.shape
    if b.shape[0] != n or b.shape[2] != r or scaling.shape[0] != n or x.shape[-1] != n_in:
        raise ValueError(f"lora_delta: shapes do not fit: x {tuple(x.shape)}, a {tuple(a.shape)} (N, r, in), "
                         f"b {tuple(b.shape)} (N, out, r), scaling {tuple(scaling.shape)} (N,)")
    if x.shape[0] != plan.batch_size:
        raise ValueError(f"lora_delta: the plan has {plan.batch_size} rows but x has {x.shape[0]}")
    if plan.used and plan.used[-1] >= n:
        raise ValueError(f"lora_delta: the plan uses adapter slot {plan.used[-1]} but only {n} are stacked")
    if out is not None and out.shape != (*x.shape[:-1], b.shape[1]):
        raise ValueError(f"lora_delta: out has shape {tuple(out.shape)}, expected {(*x.shape[:-1], b.shape[1])}")


def _kernel_into(out, x, a, b, scaling, plan: RowPlan) -> Optional[torch.Tensor]:
    """out + the term through the compiled CPU kernel, or None when it does not apply (then bmm does it)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or scaling.requires_grad):
        return None  # the kernel has no backward
    bt = b.transpose(1, 2)  # the stored layout of `new_stacked_b`: contiguous, no copy
    if not (a.is_contiguous() and bt.is_contiguous() and scaling.is_contiguous()
            and a.dtype == bt.dtype == scaling.dtype):
        return None
    return out if lora_delta_small_(out, x, a, bt, scaling, plan) else None


def lora_delta_small_(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                      scaling: torch.Tensor, plan: RowPlan) -> bool:
    """out += the LoRA term through the compiled CPU kernel when it applies; False (out untouched) otherwise.

    The lean entry for a layer that made its own stacks (a [N, r, in], bt = b transposed [N, r, out], scaling
    [N], contiguous, without autograd) and knows the shapes fit: a decode step pays no more than a few
    attribute reads here before the kernel. Anything else (GPU, other dtypes, autograd, big inputs) returns
    False and the caller uses `lora_delta`.
    """
    if not cpu_kernel._switch["on"] or x.device.type != "cpu" or x.dtype != torch.float32 \
            or out.dtype != torch.float32 or a.dtype != torch.float32 or a.shape[1] > cpu_kernel.MAX_RANK:
        return False
    tokens = x.numel() // (x.shape[0] * x.shape[-1]) if x.shape[0] else 0
    if plan.n_active == 0 or plan.n_active * tokens > _KERNEL_MAX_TOKEN_ROWS or not x.is_contiguous() \
            or not out.is_contiguous() or (torch.is_grad_enabled() and (out.requires_grad or x.requires_grad)):
        return False
    fn = cpu_kernel._load()
    if fn is None:
        return False
    cpu_kernel.call(fn, out.view(-1, out.shape[-1]), x.view(-1, x.shape[-1]), a, bt, scaling,
                    plan.kernel_segments(tokens))
    return True


def small_batch_kernel():
    """The compiled CPU kernel when it may serve the decode-sized layers of the forward about to run: switched
    on, built, and CPU autocast off (the kernel is float32 only); else None. Asked once per forward, so that
    each layer pays an attribute read for it (see `kernel_rows`)."""
    if not cpu_kernel._switch["on"] or torch.is_autocast_enabled("cpu"):
        return None
    return cpu_kernel._load()


def kernel_rows(x: torch.Tensor, plan: RowPlan) -> Optional[tuple[int, int, int, int]]:
    """The kernel's row arguments (`RowPlan.kernel_args`) for input x of this batch, or None where the kernel
    is not the path for x: not a contiguous float32 CPU tensor, or past the kernel's size (then bmm is faster)."""
    if x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous() or not plan.n_active:
        return None
    tokens = x.numel() // (x.shape[-1] * plan.batch_size)
    if plan.n_active * tokens > _KERNEL_MAX_TOKEN_ROWS:
        return None
    return plan.kernel_args(tokens)


def _used_weights(a, b, scaling, plan: RowPlan, dtype: torch.dtype):
    """The used adapters' A, B and scale: a view when the used slots are contiguous, else one gather."""
    if plan.used_range is not None:
        lo, hi = plan.used_range
        aw, bw, sw = a[lo:hi], b[lo:hi], scaling[lo:hi]
    else:
        idx = plan.used_index
        aw, bw, sw = a.index_select(0, idx), b.index_select(0, idx), scaling.index_select(0, idx)
    return aw.to(dtype), bw.to(dtype), sw.to(dtype)


def _grouped_h(x3, a, b, scaling, plan: RowPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """h = s * x A^T as [U, kT, r] in the padded layout, and the used B's transposed, [U, r, out]."""
    groups, k, tokens = len(plan.used), plan.group, x3.shape[1]
    aw, bw, sw = _used_weights(a, b, scaling, plan, x3.dtype)
    xg = x3 if plan.identity else x3.index_select(0, plan.pad_gather)
    h = torch.bmm(xg.reshape(groups, k * tokens, x3.shape[2]), aw.transpose(1, 2))
    h = h.mul_(sw.view(groups, 1, 1)) if not h.requires_grad else h * sw.view(groups, 1, 1)
    return h, bw.transpose(1, 2)


def _grouped(x3, a, b, scaling, plan: RowPlan) -> torch.Tensor:
    """[U * k, T, out] in the padded layout: two bmm's over U groups of k rows."""
    h, bt = _grouped_h(x3, a, b, scaling, plan)
    y = torch.bmm(h, bt)  # [U, kT, out]
    return y.view(len(plan.used) * plan.group, x3.shape[1], y.shape[2])


def _writable(out: torch.Tensor, x: torch.Tensor) -> bool:
    """`out` can take the term in place: same dtype, contiguous, and autograd does not need it."""
    return (out.dtype == x.dtype and out.is_contiguous()
            and not (torch.is_grad_enabled() and (out.requires_grad or x.requires_grad)))


def _grouped_into(out, x3, a, b, scaling, plan: RowPlan) -> torch.Tensor:
    """Rows already grouped: the second product accumulates straight into `out` (no [B, T, out] temporary)."""
    h, bt = _grouped_h(x3, a, b, scaling, plan)
    out.view(len(plan.used), plan.group * x3.shape[1], out.shape[-1]).baddbmm_(h, bt)
    return out


def _segments(x3, a, b, scaling, plan: RowPlan) -> torch.Tensor:
    """[n_active, T, out] in sorted-active order: one matmul pair per used adapter."""
    n_in, tokens = x3.shape[2], x3.shape[1]
    xs = x3.index_select(0, plan.active_rows)
    aw, bw, sw = _used_weights(a, b, scaling, plan, x3.dtype)
    parts, start = [], 0
    for j, count in enumerate(plan.counts):
        rows = xs[start:start + count].reshape(-1, n_in)
        h = torch.mm(rows, aw[j].t()) * sw[j]
        parts.append(torch.mm(h, bw[j].t()))
        start += count
    return torch.cat(parts).view(plan.n_active, tokens, -1)


def _scatter(y: torch.Tensor, layout: str, plan: RowPlan) -> torch.Tensor:
    """[B, T, out] from the kernel's layout, zeros for base rows."""
    if layout == "padded" and plan.identity:
        return y
    if layout == "padded" and plan.all_active:
        return y.index_select(0, plan.row_to_pad)  # one gather, filler rows skipped
    if layout == "padded" and plan.pad_valid is not None:
        y = y.index_select(0, plan.pad_valid)
    return y.new_zeros(plan.batch_size, *y.shape[1:]).index_copy_(0, plan.active_rows, y)


def _accumulate(out: torch.Tensor, y: torch.Tensor, layout: str, plan: RowPlan) -> torch.Tensor:
    """out + the term, in place when autograd allows (one index_add over the active rows)."""
    out3 = out.reshape(plan.batch_size, -1, y.shape[-1])  # a view for a contiguous `out`
    if layout == "padded" and plan.pad_valid is not None:
        y = y.index_select(0, plan.pad_valid)
    y = y.to(out.dtype)
    in_place = not (torch.is_grad_enabled() and (out.requires_grad or y.requires_grad))
    if plan.identity:
        res = out3.add_(y) if in_place else out3 + y
    else:
        res = out3.index_add_(0, plan.active_rows, y) if in_place else out3.index_add(0, plan.active_rows, y)
    return res.view(out.shape)


def stack_lora_weights(adapters: Sequence[Optional[tuple[torch.Tensor, torch.Tensor, float]]],
                       dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-adapter LoRA weights into the zero-padded tensors `lora_delta` takes.

    Args:
        adapters: per slot, (A [r_i, in], B [out, r_i], scale) or None for an empty slot (zero term).
        dtype: dtype of the stacked tensors (default: the first A's dtype).
        device: their device (default: the first A's device).

    Returns:
        (a [N, r_max, in], b [N, out, r_max], scaling [N] in `dtype`); ranks below r_max are zero-padded,
        which leaves each adapter's term unchanged. `b` is laid out as in `new_stacked_b`.

    Raises:
        ValueError: no adapter at all, or A/B shapes that disagree between themselves or across adapters.
    """
    present = [t for t in adapters if t is not None]
    if not present:
        raise ValueError("stack_lora_weights: needs at least one (A, B, scale) adapter, got none")
    n_in, n_out = present[0][0].shape[1], present[0][1].shape[0]
    for i, t in enumerate(adapters):
        if t is not None and (t[0].dim() != 2 or t[1].dim() != 2 or t[0].shape[1] != n_in
                              or t[1].shape[0] != n_out or t[0].shape[0] != t[1].shape[1]):
            raise ValueError(f"stack_lora_weights: adapter {i} has A {tuple(t[0].shape)} and B {tuple(t[1].shape)}; "
                             f"expected A [r, {n_in}] and B [{n_out}, r] with the same r")
    r_max = max(t[0].shape[0] for t in present)
    dtype = dtype or present[0][0].dtype
    device = device or present[0][0].device
    a = torch.zeros(len(adapters), r_max, n_in, dtype=dtype, device=device)
    b = new_stacked_b(len(adapters), n_out, r_max, dtype=dtype, device=device)
    scaling = torch.zeros(len(adapters), dtype=dtype, device=device)
    with torch.no_grad():
        for i, t in enumerate(adapters):
            if t is not None:
                r = t[0].shape[0]
                a[i, :r] = t[0]
                b[i, :, :r] = t[1]
                scaling[i] = float(t[2])
    return a, b, scaling


def new_stacked_b(n: int, n_out: int, r_max: int, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """A zeroed [N, out, r_max] tensor for stacked lora_B weights, stored as its transpose [N, r_max, out].

    `lora_delta` multiplies by b[s].T; with this layout that operand is contiguous, which makes the second
    `bmm` about 2x faster on CPU than a plainly allocated [N, out, r_max] tensor. Fill it as usual
    (`b[i, :, :r] = B`); the shape and the values are the same, only the strides differ.
    """
    return torch.zeros(n, r_max, n_out, dtype=dtype, device=device).transpose(1, 2)
