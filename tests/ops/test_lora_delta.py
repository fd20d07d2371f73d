"""lora_delta against float64 math done row by row (the independent reference), on every kernel path."""

from __future__ import annotations

import pytest
import torch

from peftray.ops import RowPlan, lora_delta, stack_lora_weights
from peftray.ops import lora as lora_ops


def make_adapters(ranks, n_in, n_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g) / r, 0.5 + i)
            for i, r in enumerate(ranks)]


def reference(x, adapters, slots):
    """float64, one row at a time: scale * (x A^T) B^T, zero for base rows."""
    out = torch.zeros(*x.shape[:-1], adapters[0][1].shape[0], dtype=torch.float64)
    for row, slot in enumerate(slots):
        if slot >= 0:
            a, b, s = adapters[slot]
            out[row] = (x[row].double() @ a.double().T) @ b.double().T * s
    return out


CASES = {
    "mixed with base rows": ([0, 1, 2, -1, 1, 1, 3, -1], [2, 8, 4, 16]),
    "all base": ([-1, -1, -1], [4, 4]),
    "single adapter": ([0, 0, 0, 0], [8]),
    "one row per adapter": ([3, 2, 1, 0], [4, 4, 4, 4]),
    "empty slots (1 and 3 unused)": ([0, 2, 2, 4, 0], [2, 3, 5, 7, 11]),
    "already grouped": ([0, 0, 1, 1, 2, 2], [16, 16, 16]),
    "skewed": ([1] * 7 + [0], [4, 8]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3)], ids=["2d", "1tok", "3d", "4d"])
def test_matches_float64_rows(name, lead):
    slots, ranks = CASES[name]
    adapters = make_adapters(ranks, 24, 20)
    a, b, scaling = stack_lora_weights(adapters)
    x = torch.randn(len(slots), *lead, 24, generator=torch.Generator().manual_seed(1))
    plan = RowPlan.from_indices(torch.tensor(slots))
    with torch.no_grad():
        got = lora_delta(x, a, b, scaling, plan)
        base = torch.randn(*x.shape[:-1], 20)
        summed = lora_delta(x, a, b, scaling, plan, out=base.clone())
        plain_b = lora_delta(x, a, b.contiguous(), scaling, plan)  # a plainly laid out b works the same
    want = reference(x, adapters, slots)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(plain_b.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(summed.double(), base.double() + want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("slots", [[1] * 7 + [0], [0, 1, -1, 1, 1, 1, 2, 1]])
def test_segment_path_matches(slots, monkeypatch):
    """Big, uneven inputs take the per-adapter segment path; force it at a small size and check it."""
    monkeypatch.setattr(lora_ops, "_SEGMENT_MIN_TOKENS", 1)
    calls, segments = [], lora_ops._segments
    monkeypatch.setattr(lora_ops, "_segments", lambda *args: calls.append(1) or segments(*args))
    adapters = make_adapters([4, 8, 2], 16, 12)
    a, b, scaling = stack_lora_weights(adapters)
    x = torch.randn(len(slots), 6, 16)
    plan = RowPlan.from_indices(slots)
    got = lora_delta(x, a, b, scaling, plan)
    assert calls, "the segment path was not taken"
    torch.testing.assert_close(got.double(), reference(x, adapters, slots), atol=1e-4, rtol=1e-4)



def test_bf16_close_to_float64():
    slots = [0, 1, -1, 2, 1, 0]
    adapters = make_adapters([4, 16, 8], 64, 48)
    a, b, scaling = stack_lora_weights(adapters, dtype=torch.bfloat16)
    x = torch.randn(len(slots), 3, 64)
    with torch.no_grad():
        got = lora_delta(x.bfloat16(), a, b, scaling, RowPlan.from_indices(slots))
    assert got.dtype == torch.bfloat16
    want = reference(x.bfloat16().float(), [(t[0].bfloat16().float(), t[1].bfloat16().float(), t[2])
                                            for t in adapters], slots)
    torch.testing.assert_close(got.double(), want, atol=0.1, rtol=0.03)


def test_gradients_flow_when_enabled():
    """Not needed for serving, but a training-mode caller must not get silently wrong grads."""
    adapters = make_adapters([4, 4], 8, 6)
    a, b, scaling = stack_lora_weights(adapters)
    a.requires_grad_(True)
    x = torch.randn(3, 2, 8, requires_grad=True)
    slots = [1, -1, 0]
    lora_delta(x, a, b, scaling, RowPlan.from_indices(slots)).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    reference_x = torch.zeros(3, 2, 6, dtype=torch.float64)
    for row, s in enumerate(slots):
        if s >= 0:
            reference_x[row] = (x64[row] @ a[s].detach().double().T) @ b[s].double().T * scaling[s].item()
    reference_x.sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_plan_layout():
    plan = RowPlan.from_indices([2, 0, -1, 2, 2])
    assert plan.used == (0, 2) and plan.counts == (1, 3) and plan.group == 3 and plan.n_active == 4
    assert plan.active_rows.tolist() == [1, 0, 3, 4]
    assert plan.pad_gather.tolist() == [1, 1, 1, 0, 3, 4]  # slot 0's group is padded with its own row
    assert plan.used_range is None and not plan.identity and not plan.all_active
    assert RowPlan.from_indices([0, 0, 1, 1]).identity
    assert RowPlan.from_indices([]).n_active == 0


def test_bad_input_is_named():
    a, b, scaling = stack_lora_weights(make_adapters([2], 8, 4))
    with pytest.raises(ValueError, match="slot 3"):
        lora_delta(torch.randn(2, 8), a, b, scaling, RowPlan.from_indices([0, 3]))
    with pytest.raises(ValueError, match="plan has 1 rows but x has 2"):
        lora_delta(torch.randn(2, 8), a, b, scaling, RowPlan.from_indices([0]))
    with pytest.raises(ValueError, match=">= -1"):
        RowPlan.from_indices([0, -2])
    with pytest.raises(ValueError, match="adapter 1 has A"):
        stack_lora_weights([(torch.zeros(2, 8), torch.zeros(4, 2), 1.0), (torch.zeros(2, 7), torch.zeros(4, 2), 1.0)])


def test_stack_pads_ranks_and_empty_slots():
    adapters = make_adapters([2, 5], 6, 3)
    a, b, scaling = stack_lora_weights([adapters[0], None, adapters[1]])
    assert a.shape == (3, 5, 6) and b.shape == (3, 3, 5) and scaling.tolist() == [0.5, 0.0, 1.5]
    assert a[0, 2:].abs().sum() == 0 and b[0, :, 2:].abs().sum() == 0 and a[1].abs().sum() == 0


def test_plan_follows_the_input_device():
    plan = RowPlan.from_indices([0, 1])
    assert plan.on(torch.device("cpu")) is plan
    devices = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        moved = plan.on(torch.device(dev))
        assert moved.active_rows.device.type == dev and plan.on(torch.device(dev)) is moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64(dtype):
    slots = [0, 1, 2, -1, 1, 1, 3, -1]
    adapters = make_adapters([2, 8, 4, 16], 64, 40)
    a, b, scaling = stack_lora_weights(adapters, dtype=dtype, device=torch.device("cuda"))
    x = torch.randn(len(slots), 9, 64)
    with torch.no_grad():
        got = lora_delta(x.to("cuda", dtype), a, b, scaling, RowPlan.from_indices(torch.tensor(slots, device="cuda")))
    want = reference(x.to(dtype).float(), [(t[0].to(dtype).float(), t[1].to(dtype).float(), t[2])
                                           for t in adapters], slots)
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=0.1, rtol=0.03)
    torch.testing.assert_close(got.double().cpu(), want, **tol)
