"""Mixed-adapter decode steps: the compiled-kernel path of the LoRA layers against HF PEFT and the PyTorch path,
the reuse of the row plan from step to step, and when the stacked adapter weights are (and are not) rebuilt."""

from __future__ import annotations

import copy

import peft
import torch

import peftray
from peftray.ops import cpu_kernel
from peftray.tuners.lora.layer import Linear
from peftray.tuners.mixed import build_mixed_batch, mixed_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = ["a", "b", "c"]


def _pair(load):
    """HF PEFT and peftray models with the same three random adapters (different ranks), eval mode."""
    ref = None
    for i, name in enumerate(NAMES):
        cfg = dict(r=2 + 2 * i, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        if ref is None:
            torch.manual_seed(0)
            ref = peft.get_peft_model(load(), peft.LoraConfig(**cfg), adapter_name=name)
            ours = peftray.get_peft_model(load(), peftray.LoraConfig(**cfg), adapter_name=name)
        else:
            ref.add_adapter(name, peft.LoraConfig(**cfg))
            ours.add_adapter(name, peftray.LoraConfig(**cfg))
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
                ref_params[n].copy_(p)
    return ref.eval(), ours.eval()


def _decode_batch():
    rows = ["a", "c", "__base__", "b", "a", "c", "b"]
    ids = torch.randint(0, 100, (len(rows), 1), generator=torch.Generator().manual_seed(3))
    return ids, rows


def test_decode_step_kernel_equals_hf_peft_and_the_pytorch_path(llama, monkeypatch):
    ref, ours = _pair(llama)
    ids, rows = _decode_batch()
    calls = []
    real_run = cpu_kernel.run
    monkeypatch.setattr(cpu_kernel, "run", lambda *a: calls.append(1) or real_run(*a))
    with torch.inference_mode():
        want = ref(input_ids=ids, adapter_names=rows).logits
        fast = ours(input_ids=ids, adapter_names=rows).logits
        with cpu_kernel.use(False):
            plain = ours(input_ids=ids, adapter_names=rows).logits
    # one call per group of projections reading the same input: q/k/v, o, gate/up, down
    assert cpu_kernel.available() and len(calls) == 4 * ours.config.num_hidden_layers
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    with ours.disable_adapter(), torch.inference_mode():
        assert (fast - ours(input_ids=ids).logits).abs().max() > 1e-3  # the adapters do change the rows


def test_the_row_plan_is_reused_while_the_rows_stay_the_same(llama):
    _, ours = _pair(llama)
    ids, rows = _decode_batch()
    with torch.inference_mode():
        ours(input_ids=ids, adapter_names=rows)
        first = ours._last_mixed.plan
        ours(input_ids=ids, adapter_names=list(rows))
        assert ours._last_mixed.plan is first
        ours(input_ids=ids[:-1], adapter_names=rows[:-1])
        assert ours._last_mixed.plan is not first and ours._last_mixed.plan.batch_size == len(rows) - 1
    assert "_last_mixed" not in vars(copy.deepcopy(ours))  # it holds the kernel's handle: not copied, not pickled


def test_stacks_are_kept_until_a_weight_changes(llama):
    _, ours = _pair(llama)
    ids, rows = _decode_batch()
    layers = [m for m in ours.modules() if isinstance(m, Linear)]

    def step():
        with torch.inference_mode():
            ours(input_ids=ids, adapter_names=rows)
        return [m._stack for m in layers]

    first = step()
    torch.nn.Linear(4, 4)  # modules registered elsewhere (model code does it every forward) change nothing
    assert all(a is b for a, b in zip(step(), first))
    q = ours.get_base_model().model.layers[0].self_attn.q_proj
    # in place (an optimizer step), a new Parameter, a new module, and new storage each restack that layer only
    changes = [
        lambda: q.lora_B["b"].weight.mul_(2.0),
        lambda: setattr(q.lora_A["a"], "weight", torch.nn.Parameter(torch.randn_like(q.lora_A["a"].weight))),
        lambda: q.lora_A.__setitem__("c", copy.deepcopy(q.lora_A["c"])),
        lambda: setattr(q.lora_B["a"].weight, "data", q.lora_B["a"].weight.data.clone() * 3),
    ]
    for change in changes:
        before = step()
        with torch.no_grad():
            change()
        after = step()
        assert [i for i, (x, y) in enumerate(zip(before, after)) if x is not y] == [layers.index(q)]
        mixed = after[layers.index(q)]
        for i, name in enumerate(ours.peft_config):
            r = q.r[name]
            torch.testing.assert_close(mixed.a[i, :r], q.lora_A[name].weight)
            torch.testing.assert_close(mixed.b[i, :, :r], q.lora_B[name].weight)


def _unlinked(layers):
    """The layers' sibling links, removed (each layer then takes its own kernel call)."""
    saved = {m: m._siblings for m in layers}
    for m in layers:
        m._siblings = ()
    return saved


def test_siblings_reading_one_input_share_a_kernel_call_and_fall_back_when_called_apart(llama):
    _, ours = _pair(llama)
    ids, rows = _decode_batch()
    attn = ours.get_base_model().model.layers[0].self_attn
    mlp = ours.get_base_model().model.layers[0].mlp
    assert attn.q_proj._siblings == (attn.q_proj, attn.k_proj, attn.v_proj) and attn.o_proj._siblings == ()
    assert mlp.gate_proj._siblings == (mlp.gate_proj, mlp.up_proj) and mlp.down_proj._siblings == ()
    layers = [m for m in ours.modules() if isinstance(m, Linear)]
    with torch.inference_mode():
        fast = ours(input_ids=ids, adapter_names=rows).logits
        saved = _unlinked(layers)
        alone = ours(input_ids=ids, adapter_names=rows).logits
        # the same projections called directly: the q/k/v group in any order, and k on another tensor
        batch = build_mixed_batch(rows, tuple(ours.peft_config), torch.device("cpu"))
        x, other = torch.randn(2, len(rows), 1, 64, generator=torch.Generator().manual_seed(5))
        with mixed_batch(batch):
            want = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.k_proj(other)]
        for m, sib in saved.items():
            m._siblings = sib
        with mixed_batch(batch):
            got_v = attn.v_proj(x)  # first of its group: computes q and k too
            assert set(batch.stash) == {attn.q_proj, attn.k_proj}
            got_k_other = attn.k_proj(other)  # another tensor: its own output, not the stashed one
            got = [attn.q_proj(x), attn.k_proj(x), got_v, got_k_other]
        assert not batch.stash  # emptied when the forward ends
    torch.testing.assert_close(fast, alone, atol=0, rtol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    assert (want[1] - want[3]).abs().max() > 1e-3


def _copy_random(ours, ref):
    ref_params = dict(ref.named_parameters()) if ref is not None else {}
    with torch.no_grad():
        torch.manual_seed(1)
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "magnitude" in n else 0.0))
                if n in ref_params:
                    ref_params[n].copy_(p)


def test_an_adapter_on_part_of_a_group_and_a_dora_adapter_beside_it(llama, monkeypatch):
    qv = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ref = peft.get_peft_model(llama(), peft.LoraConfig(**qv), adapter_name="qv").eval()
    ours = peftray.get_peft_model(llama(), peftray.LoraConfig(**qv), adapter_name="qv").eval()
    _copy_random(ours, ref)
    attn = ours.get_base_model().model.layers[0].self_attn
    assert attn.q_proj._siblings == (attn.q_proj, attn.v_proj)  # k_proj is no LoRA layer here
    ids = torch.randint(0, 100, (5, 1), generator=torch.Generator().manual_seed(2))
    calls = []
    real_run = cpu_kernel.run
    monkeypatch.setattr(cpu_kernel, "run", lambda *a: calls.append(len(a[2]) // cpu_kernel.ENTRY) or real_run(*a))
    with torch.inference_mode():
        want = ref(input_ids=ids, adapter_names=["qv", "__base__", "qv", "qv", "__base__"]).logits
        got = ours(input_ids=ids, adapter_names=["qv", "__base__", "qv", "qv", "__base__"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls == [2] * ours.config.num_hidden_layers  # q and v in one call per layer
    # A DoRA adapter on q and k: its term depends on the base output, so those layers take their own path.
    ours.add_adapter("dora", peftray.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"],
                                                use_dora=True, init_lora_weights=False))
    _copy_random(ours, None)
    ours.eval()
    rows = ["qv", "dora", "__base__", "dora", "qv"]
    with torch.inference_mode():
        got = ours(input_ids=ids, adapter_names=rows).logits
        for i, name in enumerate(rows):  # HF PEFT refuses DoRA in mixed batches: each row alone is the reference
            if name == "__base__":
                with ours.disable_adapter():
                    alone = ours(input_ids=ids[i:i + 1]).logits
            else:
                ours.set_adapter(name)
                alone = ours(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(got[i:i + 1], alone, atol=1e-5, rtol=1e-5)
