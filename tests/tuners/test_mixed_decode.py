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


def _layers(ours):
    return [m for m in ours.modules() if isinstance(m, Linear)]


def _step(ours, ids, rows):
    with torch.inference_mode():
        logits = ours(input_ids=ids, adapter_names=rows).logits
    return logits, [m._stack for m in _layers(ours)]


def _assert_stack_holds_the_weights(layer, names):
    st = layer._stack
    for i, name in enumerate(names):
        r = layer.r[name]
        torch.testing.assert_close(st.a[i, :r], layer.lora_A[name].weight, atol=0, rtol=0)
        torch.testing.assert_close(st.b[i, :, :r], layer.lora_B[name].weight, atol=0, rtol=0)


def test_the_stack_is_the_adapters_memory(llama):
    _, ours = _pair(llama)
    ids, rows = _decode_batch()
    _step(ours, ids, rows)
    for layer in _layers(ours):
        st = layer._stack
        assert st.aliased
        for i, name in enumerate(NAMES):
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            assert a.data_ptr() == st.a[i].data_ptr() and b.data_ptr() == st.b[i].data_ptr()
            assert type(a) is torch.nn.Parameter and not a.is_inference() and not b.is_inference()
    # one copy of the adapters: the stacks hold the weights' bytes, nothing else does
    q = ours.get_base_model().model.layers[0].self_attn.q_proj
    assert q.lora_A["b"].weight.untyped_storage().data_ptr() == q._stack.a.untyped_storage().data_ptr()


def test_in_place_changes_by_any_route_are_seen_without_a_restack(llama):
    ref, ours = _pair(llama)
    ids, rows = _decode_batch()
    _, first = _step(ours, ids, rows)
    torch.nn.Linear(4, 4)  # modules registered elsewhere (model code does it every forward) change nothing
    q = ours.get_base_model().model.layers[0].self_attn.q_proj
    ref_params, ours_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    changes = [  # (what, the parameter's name in both models): an optimizer step, `.data` routes, a load
        (lambda w: w.mul_(2.0), "lora_B.b.weight"),
        (lambda w: w.data.mul_(3.0), "lora_A.c.weight"),
        (lambda w: w.data.copy_(torch.randn_like(w) * 0.1), "lora_B.a.weight"),
    ]
    for change, name in changes:
        with torch.no_grad():
            change(ours_params[prefix + name])
            ref_params[prefix + name].copy_(ours_params[prefix + name])
        got, stacks = _step(ours, ids, rows)
        assert all(x is y for x, y in zip(stacks, first)), name  # no layer restacked: nothing needed copying
        with torch.inference_mode():
            torch.testing.assert_close(got, ref(input_ids=ids, adapter_names=rows).logits, atol=1e-5, rtol=1e-5)
    _assert_stack_holds_the_weights(q, NAMES)
    state = {prefix + "lora_A.a.weight": torch.randn_like(q.lora_A["a"].weight)}
    ours.load_state_dict(state, strict=False)
    _, stacks = _step(ours, ids, rows)
    assert all(x is y for x, y in zip(stacks, first))
    torch.testing.assert_close(q._stack.a[0, :q.r["a"]], state[prefix + "lora_A.a.weight"], atol=0, rtol=0)


def test_weights_given_other_memory_restack_that_layer_only(llama):
    _, ours = _pair(llama)
    ids, rows = _decode_batch()
    layers = _layers(ours)
    q = ours.get_base_model().model.layers[0].self_attn.q_proj
    changes = [  # a new Parameter, a new module, new storage (`.data =`), a module moved (`.to()`)
        lambda: setattr(q.lora_A["a"], "weight", torch.nn.Parameter(torch.randn_like(q.lora_A["a"].weight))),
        lambda: q.lora_A.__setitem__("c", copy.deepcopy(q.lora_A["c"])),
        lambda: setattr(q.lora_B["a"].weight, "data", q.lora_B["a"].weight.data.clone() * 3),
        lambda: q.lora_B["c"].to(torch.float64).to(torch.float32),
    ]
    for change in changes:
        _, before = _step(ours, ids, rows)
        with torch.no_grad():
            change()
        _, after = _step(ours, ids, rows)
        assert [i for i, (x, y) in enumerate(zip(before, after)) if x is not y] == [layers.index(q)]
        assert q._stack.aliased  # the new weights are rebound to the new stack
        _assert_stack_holds_the_weights(q, NAMES)


def test_a_weight_that_is_a_view_of_another_buffer_is_copied_not_rebound(llama):
    # e.g. FSDP's flat parameter: the stack must not take the weight away from the buffer it belongs to
    ref, ours = _pair(llama)
    ids, rows = _decode_batch()
    q = ours.get_base_model().model.layers[0].self_attn.q_proj
    w = q.lora_B["b"].weight
    flat = torch.zeros(w.numel() + 8)
    flat[8:].copy_(w.detach().flatten())
    w.data = flat[8:].view_as(w)
    _step(ours, ids, rows)
    assert not q._stack.aliased and w.data_ptr() == flat[8:].data_ptr()
    assert all(m._stack.aliased for m in _layers(ours) if m is not q)
    with torch.no_grad():  # a copied stack still sees in-place changes through the weight (its version counter)
        w.mul_(2.0)
        dict(ref.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.b.weight"].copy_(w)
    got, _ = _step(ours, ids, rows)
    with torch.inference_mode():
        torch.testing.assert_close(got, ref(input_ids=ids, adapter_names=rows).logits, atol=1e-5, rtol=1e-5)
    assert flat[8:].view_as(w).equal(w)


def test_training_after_a_mixed_forward_updates_what_the_next_one_reads(llama, tmp_path):
    ref, ours = _pair(llama)
    ids, rows = _decode_batch()
    _step(ours, ids, rows)  # stacks built under inference_mode: the weights now live in them
    ours.train()
    ours.set_adapter("b")
    trainable = [p for n, p in ours.named_parameters() if ".b." in n and "lora_" in n]
    assert trainable and all(p.requires_grad for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    text = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(4))
    before = [p.detach().clone() for p in trainable]
    for _ in range(2):
        loss = ours(input_ids=text, labels=text).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not p.equal(b) for p, b in zip(trainable, before))
    ours.eval()
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            ref_params[n].copy_(p)
    got, _ = _step(ours, ids, rows)
    with torch.inference_mode():
        torch.testing.assert_close(got, ref(input_ids=ids, adapter_names=rows).logits, atol=1e-5, rtol=1e-5)
    # the saved adapter is the trained one, in HF PEFT's format, loadable by HF PEFT
    ours.save_pretrained(str(tmp_path), selected_adapters=["b"])
    loaded = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "b"), adapter_name="b").eval()
    ours.set_adapter("b")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_inside_a_fixed_weights_scope_each_stack_is_checked_once(llama, monkeypatch):
    from peftray.tuners.lora import stack
    from peftray.tuners.mixed import fixed_adapter_weights

    ref, ours = _pair(llama)
    ids, rows = _decode_batch()
    reads, versions = [], []
    monkeypatch.setattr(stack, "_ADDRESS", lambda p: reads.append(1) or p.data_ptr())
    monkeypatch.setattr(stack, "_VERSION", lambda p: versions.append(1) or p._version)
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
        versions.clear()
        ours(input_ids=ids, adapter_names=rows)  # outside any scope: every call checks
        assert len(reads) == n_layers * 2 * len(NAMES)
        assert versions == []  # the stacks are the weights' memory: only their addresses need checking
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
    monkeypatch.setattr(stack, "_ADDRESS", lambda p: reads.append(1) or p.data_ptr())
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        got = ours.generate(input_ids=ids, adapter_names=rows, **kw)
        want = ref.generate(input_ids=ids, adapter_names=rows, **kw)
    assert torch.equal(got, want)
    n_layers = sum(isinstance(m, Linear) for m in ours.modules())
    assert len(reads) == n_layers * 2 * len(NAMES)  # 6 decode steps, one check per layer
