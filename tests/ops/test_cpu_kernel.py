"""The compiled CPU kernel for small mixed-adapter batches: built here, used by lora_delta, same numbers as float64."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from test_lora_delta import make_adapters, reference

from peftray.ops import RowPlan, cpu_kernel, lora_delta, lora_delta_small_, stack_lora_weights

SLOTS = [0, 1, 2, -1, 1, 1, 3, -1, 2, 0]
RANKS = [2, 8, 4, 16]


def test_kernel_builds_where_a_compiler_exists():
    # This machine (and CI) has gcc: the kernel must build and load, not silently fall back.
    assert shutil.which("cc") or shutil.which("gcc")
    assert cpu_kernel.available()


@pytest.mark.parametrize("lead", [(), (1,), (3,)], ids=["2d", "decode", "3-token rows"])
def test_kernel_path_matches_float64_and_the_pytorch_path(lead, monkeypatch):
    adapters = make_adapters(RANKS, 40, 72)
    a, b, scaling = stack_lora_weights(adapters)
    x = torch.randn(len(SLOTS), *lead, 40, generator=torch.Generator().manual_seed(3))
    base = torch.randn(*x.shape[:-1], 72, generator=torch.Generator().manual_seed(4))
    plan = RowPlan.from_indices(SLOTS)
    want = base.double() + reference(x, adapters, SLOTS)
    calls = []
    real_call = cpu_kernel.call
    monkeypatch.setattr(cpu_kernel, "call", lambda *args: calls.append(1) or real_call(*args))
    with torch.inference_mode():
        fused = lora_delta(x, a, b, scaling, plan, out=base.clone())
        with cpu_kernel.use(False):
            plain = lora_delta(x, a, b, scaling, plan, out=base.clone())
    assert calls == [1], "the small float32 batch did not take the compiled kernel"
    torch.testing.assert_close(fused.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_kernel_is_skipped_where_it_does_not_apply(monkeypatch):
    adapters = make_adapters(RANKS, 16, 8)
    a, b, scaling = stack_lora_weights(adapters)
    plan = RowPlan.from_indices(SLOTS)
    x = torch.randn(len(SLOTS), 16)
    calls = []
    monkeypatch.setattr(cpu_kernel, "call", lambda *args: calls.append(1))
    # autograd through A (no backward in the kernel), float64, and no `out` all take the PyTorch path
    a_req = a.clone().requires_grad_(True)
    y = lora_delta(x, a_req, b, scaling, plan, out=torch.zeros(len(SLOTS), 8))
    y.sum().backward()
    assert a_req.grad is not None and a_req.grad.abs().sum() > 0
    with torch.no_grad():
        lora_delta(x.double(), a.double(), b.double(), scaling.double(), plan, out=torch.zeros(len(SLOTS), 8).double())
        lora_delta(x, a, b, scaling, plan)
    assert calls == []


def test_checked_entry_point_refuses_bad_layouts():
    a, b, scaling = stack_lora_weights(make_adapters([4], 8, 6))
    bt = b.transpose(1, 2)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernel.lora_rows_(torch.zeros(1, 6).double(), torch.zeros(1, 8).double(), a, bt, scaling, [0])
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernel.lora_rows_(torch.zeros(1, 12)[:, ::2], torch.zeros(1, 8), a, bt, scaling, [0])
    with pytest.raises(ValueError, match="1 slots"):
        cpu_kernel.lora_rows_(torch.zeros(2, 6), torch.zeros(2, 8), a, bt, scaling, [0])
    # 20 rows of one adapter: more than one run of rows, so the runs must each add their own rows only
    x = torch.randn(21, 8, generator=torch.Generator().manual_seed(5))
    slots = [0] * 20 + [-1]
    out = cpu_kernel.lora_rows_(torch.zeros(21, 6), x, a, bt.contiguous(), scaling, slots)
    want = (x.double() @ a[0].double().T) @ b[0].double().T * scaling[0].double()
    want[20] = 0
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_disabled_by_environment_falls_back(tmp_path):
    code = "from peftray.ops import cpu_kernel; print(cpu_kernel.available())"
    env = {"PEFTRAY_CPU_KERNEL": "0", "PATH": "/usr/bin:/bin", "PEFTRAY_CACHE_DIR": str(tmp_path)}
    import os

    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_layer_entry_adds_in_place_or_declines():
    adapters = make_adapters(RANKS, 40, 72)
    a, b, scaling = stack_lora_weights(adapters)
    bt = b.transpose(1, 2)
    x = torch.randn(len(SLOTS), 1, 40, generator=torch.Generator().manual_seed(6))
    base = torch.randn(len(SLOTS), 1, 72, generator=torch.Generator().manual_seed(7))
    plan = RowPlan.from_indices(SLOTS)
    out = base.clone()
    with torch.inference_mode():
        assert lora_delta_small_(out, x, a, bt, scaling, plan)
        torch.testing.assert_close(out.double(), base.double() + reference(x, adapters, SLOTS), atol=1e-5, rtol=1e-5)
        big = torch.randn(len(SLOTS), 64, 40)  # 8 active rows x 64 tokens: past the kernel's size, bmm's job
        untouched = torch.zeros(len(SLOTS), 64, 72)
        assert not lora_delta_small_(untouched, big, a, bt, scaling, plan)
        assert not lora_delta_small_(base.double(), x.double(), a.double(), bt.double(), scaling.double(), plan)
        with cpu_kernel.use(False):
            assert not lora_delta_small_(base.clone(), x, a, bt, scaling, plan)
    assert untouched.abs().sum() == 0


def test_one_call_serves_projections_that_share_an_input():
    # q/k/v-like: one x, four stacks of different widths and ranks, four outputs; each equals float64 math. The
    # widths and ranks leave remainders for every vector width (8, 16) and for the B products' four-row passes.
    x = torch.randn(len(SLOTS), 40, generator=torch.Generator().manual_seed(8))
    plan = RowPlan.from_indices(SLOTS)
    table, outs, wants = [], [], []
    for seed, (n_out, ranks) in enumerate([(72, RANKS), (24, [4, 4, 4, 4]), (24, [1, 2, 3, 5]), (27, [7, 6, 1, 3])]):
        adapters = make_adapters(ranks, 40, n_out, seed=seed)
        a, b, scaling = stack_lora_weights(adapters)
        bt = b.transpose(1, 2)
        out = torch.randn(len(SLOTS), n_out, generator=torch.Generator().manual_seed(9 + seed))
        wants.append(out.double() + reference(x, adapters, SLOTS))
        table += [*cpu_kernel.weights_entry(a, bt, scaling), out.data_ptr(), n_out]
        outs.append((out, a, bt, scaling))  # keep the stacks alive for the call
    cpu_kernel.run(cpu_kernel._load(), x, table, plan.kernel_args(1))
    for (out, *_), want in zip(outs, wants):
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
