"""Mixed-adapter decode steps: the compiled-kernel path of the LoRA layers against HF PEFT and the PyTorch path,
the reuse of the row plan from step to step, and when the stacked adapter weights are (and are not) rebuilt."""

from __future__ import annotations

import copy

import peft
import torch

import peftray
from peftray.ops import cpu_kernel
from peftray.tuners.lora.layer import Linear

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
    assert cpu_kernel.available() and len(calls) == len(TARGETS) * ours.config.num_hidden_layers
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


def test_inside_a_fixed_weights_scope_each_stack_is_checked_once(llama, monkeypatch):
    from peftray.tuners.lora import stack
    from peftray.tuners.mixed import fixed_adapter_weights

    ref, ours = _pair(llama)
    ids, rows = _decode_batch()
    reads = []
    monkeypatch.setattr(stack, "_VERSION", lambda p: reads.append(1) or p._version)
    n_layers = sum(isinstance(m, Linear) for m in ours.modules())
    q = ours.get_base_model().model.layers[0].self_attn.q_proj
    with torch.inference_mode():
        ours(input_ids=ids, adapter_names=rows)  # stacks built
        with fixed_adapter_weights() as scope:
            reads.clear()
            for _ in range(3):
                ours(input_ids=ids, adapter_names=rows)
            assert len(reads) == n_layers * 2 * len(NAMES)  # once per layer (A and B of 3 adapters), not 3 times
        reads.clear()
        with fixed_adapter_weights(scope):  # the same scope again: nothing to re-read
            ours(input_ids=ids, adapter_names=rows)
        assert reads == []
        ours(input_ids=ids, adapter_names=rows)  # outside any scope: every call checks
        assert len(reads) == n_layers * 2 * len(NAMES)
        # what a scope promises still covers adding and deleting adapters: those are seen inside the same scope
        with fixed_adapter_weights(scope):
            ours.delete_adapter("c")
            ref.delete_adapter("c")
            rows2 = [r if r != "c" else "a" for r in rows]
            got = ours(input_ids=ids, adapter_names=rows2).logits
            torch.testing.assert_close(got, ref(input_ids=ids, adapter_names=rows2).logits, atol=1e-5, rtol=1e-5)
        # a weight changed in place is seen by a new scope (and by calls outside any scope)
        with torch.no_grad():
            q.lora_B["a"].weight.mul_(3.0)
            dict(ref.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.a.weight"].mul_(3.0)
        with fixed_adapter_weights():
            got = ours(input_ids=ids, adapter_names=rows2).logits
        torch.testing.assert_close(got, ref(input_ids=ids, adapter_names=rows2).logits, atol=1e-5, rtol=1e-5)


def test_generate_with_adapter_names_checks_the_stacks_once(llama, monkeypatch):
    from peftray.tuners.lora import stack

    ref, ours = _pair(llama)
    ids, rows = _decode_batch()
    with torch.inference_mode():
        ours(input_ids=ids, adapter_names=rows)  # stacks built
    reads = []
    monkeypatch.setattr(stack, "_VERSION", lambda p: reads.append(1) or p._version)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        got = ours.generate(input_ids=ids, adapter_names=rows, **kw)
        want = ref.generate(input_ids=ids, adapter_names=rows, **kw)
    assert torch.equal(got, want)
    n_layers = sum(isinstance(m, Linear) for m in ours.modules())
    assert len(reads) == n_layers * 2 * len(NAMES)  # 6 decode steps, one check per layer
