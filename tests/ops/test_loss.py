"""peftray's fused causal-LM loss against transformers' ForCausalLMLoss (the reference), value and gradient."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from peftray.ops import loss as loss_ops
from peftray.ops.loss import causal_lm_loss

VOCAB = 97


def _case(seed, dtype=torch.float32, batch=3, seq=11, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, VOCAB, generator=g) * spread).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels[0, :4] = -100  # a masked prompt
    return logits, labels


def _loss_and_grad(fn, logits, labels, **kwargs):
    logits.grad = None
    loss = fn(logits, labels, VOCAB, **kwargs)
    (loss * 1.7).backward()  # a non-unit upstream gradient
    return loss.detach(), logits.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 25, "tensor"])
def test_value_and_gradient_match_transformers(dtype, num_items):
    logits, labels = _case(0, dtype)
    kwargs = {}
    if num_items is not None:
        kwargs["num_items_in_batch"] = torch.tensor(25) if num_items == "tensor" else num_items
    ref_loss, ref_grad = _loss_and_grad(ForCausalLMLoss, logits, labels, **kwargs)
    loss, grad = _loss_and_grad(causal_lm_loss, logits, labels, **kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-5, atol=1e-7)


def test_given_shift_labels_and_custom_ignore_index():
    logits, labels = _case(1)
    shift = labels.clone()
    shift[shift == -100] = 7
    shift[:, -1] = 7  # 7 = the ignore index here: every row's last position and any real 7 are skipped
    kwargs = dict(shift_labels=shift, ignore_index=7)
    ref_loss, ref_grad = _loss_and_grad(ForCausalLMLoss, logits, None, **kwargs)
    loss, grad = _loss_and_grad(causal_lm_loss, logits, None, **kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_very_unlikely_targets_keep_full_precision():
    """A target probability below fp32's normal range is recomputed exactly (loss ~200 nats here)."""
    logits, labels = _case(2, spread=1.0)
    with torch.no_grad():
        logits[:, :, 5] = 200.0
    labels[:, 1:] = 6
    ref_loss, ref_grad = _loss_and_grad(ForCausalLMLoss, logits, labels)
    loss, grad = _loss_and_grad(causal_lm_loss, logits, labels)
    assert float(ref_loss) > 150
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_all_labels_ignored_gives_nan_like_transformers():
    logits, labels = _case(3)
    labels[:] = -100
    assert torch.isnan(ForCausalLMLoss(logits, labels, VOCAB))
    assert torch.isnan(causal_lm_loss(logits, labels, VOCAB))


def test_no_grad_path_matches():
    logits, labels = _case(4)
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(logits, labels, VOCAB), ForCausalLMLoss(logits, labels, VOCAB))


def test_label_outside_the_vocabulary_is_named():
    logits, labels = _case(5)
    labels[1, 3] = VOCAB + 5
    with pytest.raises(IndexError, match=f"label {VOCAB + 5} is out of range for a vocabulary of {VOCAB}"):
        causal_lm_loss(logits, labels, VOCAB)


def test_backward_twice_with_retain_graph():
    logits, labels = _case(6)
    loss = causal_lm_loss(logits, labels, VOCAB)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    (loss * 1).backward()  # a second pass through the same node, upstream gradient 1 again
    torch.testing.assert_close(logits.grad, 2 * first)


def test_a_second_loss_on_the_logits_still_gets_its_gradient():
    logits, labels = _case(7)
    extra = lambda t: t.pow(2).mean()  # noqa: E731
    logits.grad = None
    (ForCausalLMLoss(logits * 1, labels, VOCAB) + extra(logits * 1)).backward()
    ref = logits.grad.clone()
    logits.grad = None
    (causal_lm_loss(logits * 1, labels, VOCAB) + extra(logits * 1)).backward()
    torch.testing.assert_close(logits.grad, ref, rtol=1e-5, atol=1e-8)


def test_two_losses_alive_at_once_do_not_share_a_buffer():
    """Gradient accumulation style: two forwards before one backward; the pooled buffer must not be reused."""
    logits, labels = _case(8)
    logits.grad = None
    (ForCausalLMLoss(logits, labels, VOCAB) + ForCausalLMLoss(logits * 2, labels, VOCAB)).backward()
    ref = logits.grad.clone()
    logits.grad = None
    (causal_lm_loss(logits, labels, VOCAB) + causal_lm_loss(logits * 2, labels, VOCAB)).backward()
    torch.testing.assert_close(logits.grad, ref, rtol=1e-5, atol=1e-8)


def test_the_buffer_is_reused_from_step_to_step():
    """The point of the pool: a training loop touches the [tokens, vocab] buffer's memory once, not each step."""
    logits, labels = _case(9, batch=2, seq=13)
    pointers = set()
    for _ in range(4):
        loss = causal_lm_loss(logits * 1, labels, VOCAB)  # the previous step's `loss` is still alive here
        loss.backward()
        pointers.add(loss_ops._POOL._buffer.data_ptr())
    assert len(pointers) == 1
    loss_ops.release_loss_buffer()
    assert loss_ops._POOL._buffer is None
