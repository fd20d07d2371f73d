"""A fused LoRA linear for training: y = x W^T + b + s (x A^T) B^T in one autograd node.

Compared with three nn.Linear nodes plus a scale and an add, it scales the small [tokens, r] intermediate
instead of the [tokens, out] product, accumulates the low-rank term into the base output in place, and in
backward computes only the gradients asked for (never the frozen W's), reusing g B for both dx and dA.
Saved for backward: x (already alive for the base layer), x A^T s ([tokens, r]) and the weights.
"""

from __future__ import annotations

import torch

from peftray.ops.precision import autocast_dtype, autocast_off, cast_all


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa = torch.mm(x2, lora_a.t()).mul_(scaling)
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        out.addmm_(xa, lora_b.t())
        ctx.scaling = scaling
        ctx.x_shape = shape
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        gb = torch.mm(g, lora_b) if (need_x or need_a) else None  # [tokens, r]
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = torch.mm(g, weight).addmm_(gb, lora_a, alpha=s).view(ctx.x_shape)
        if need_w:
            grad_w = torch.mm(g.t(), x2)
        if need_bias:
            grad_bias = g.sum(0)
        if need_a:
            grad_a = torch.mm(gb.t(), x2).mul_(s)
        if need_b:
            grad_b = torch.mm(g.t(), xa)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """x W^T + b + scaling * (x A^T) B^T with the fused backward above.

    Under autocast every operand is cast to the autocast dtype first (autocast itself would not cast the
    in-place `addmm_` nor what backward reuses): the same bf16/fp16 matmuls as an nn.Linear under autocast,
    and float32 adapter weights still get float32 gradients through the cast.
    """
    dtype = autocast_dtype(x)
    if dtype is None:
        return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, float(scaling))
    x, weight, bias, lora_a, lora_b = cast_all(dtype, x, weight, bias, lora_a, lora_b)
    with autocast_off(x):
        return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, float(scaling))
