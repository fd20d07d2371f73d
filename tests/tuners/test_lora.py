"""LoRA specifics: merging, several adapters, QLoRA, and training equal to HF PEFT's."""

from __future__ import annotations

import bitsandbytes  # noqa: F401 - a hard import: a missing dependency fails CI instead of skipping
import peft
import pytest
import torch

import peftray
import peftray.ops  # noqa: F401 - the mixed-batch kernels; a hard import, as above
from tuner_helpers import llama_inputs, logits, minilm_inputs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(load, name="default", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = peftray.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=TARGETS, init_lora_weights=False, **kw)
    return peftray.get_peft_model(load(), cfg, adapter_name=name)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_round_trip_and_merge_and_unload(llama, use_dora):
    model = _lora(llama, use_dora=use_dora)
    inputs = llama_inputs()
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    out = logits(model, inputs)
    model.merge_adapter()
    assert (logits(model, inputs) - out).abs().max() < 1e-5
    changed = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(changed, before["model.layers.0.self_attn.q_proj.base_layer.weight"])
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # exact bits, not approximately
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert (logits(merged, inputs) - out).abs().max() < 1e-5
    assert not any("lora" in k for k in merged.state_dict())


def test_several_adapters_set_delete_and_repeated_load(llama, tmp_path):
    inputs = llama_inputs()
    model_a, model_b = _lora(llama, seed=1), _lora(llama, seed=2)
    out_a, out_b = logits(model_a, inputs), logits(model_b, inputs)
    model_a.save_pretrained(tmp_path / "a")
    model_b.save_pretrained(tmp_path / "b")
    model = peftray.PeftModel.from_pretrained(llama(), tmp_path / "a", adapter_name="a")
    for _ in range(3):  # the serving engine loads and evicts slots over and over
        model.load_adapter(tmp_path / "b", adapter_name="b")
        model.set_adapter("b")
        assert (logits(model, inputs) - out_b).abs().max() < 1e-6
        model.set_adapter("a")
        assert (logits(model, inputs) - out_a).abs().max() < 1e-6
        model.delete_adapter("b")
        assert "b" not in model.peft_config
        assert not any(".b." in k for k in model.state_dict())
    config, state = peftray.read_adapter(tmp_path / "b")
    model.load_adapter((config, state), adapter_name="b2")
    model.set_adapter("b2")
    assert (logits(model, inputs) - out_b).abs().max() < 1e-6
    with pytest.raises(peftray.errors.ConfigError if hasattr(peftray, "errors") else Exception):
        model.set_adapter("nope")


def test_mixed_adapter_batch_matches_single_adapters_and_peft(llama, tmp_path):
    inputs = llama_inputs()
    ids = torch.cat([inputs["input_ids"]] * 2)
    names = ["a", "__base__", "b", "a"]
    paths = {}
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        cfg = peftray.LoraConfig(task_type="CAUSAL_LM", r=4 * seed, target_modules=TARGETS, init_lora_weights=False)
        peftray.get_peft_model(llama(), cfg).save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    ours = peftray.PeftModel.from_pretrained(llama(), paths["a"], adapter_name="a")
    ours.load_adapter(paths["b"], adapter_name="b")
    ref = peft.PeftModel.from_pretrained(llama(), paths["a"], adapter_name="a")
    ref.load_adapter(paths["b"], adapter_name="b")
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=names).logits
        ref_mixed = ref(input_ids=ids, adapter_names=names).logits
    assert (mixed - ref_mixed).abs().max() < 1e-3
    for row, name in enumerate(names):
        if name == "__base__":
            with ours.disable_adapter(), torch.no_grad():
                single = ours(input_ids=ids[row:row + 1]).logits
        else:
            ours.set_adapter(name)
            with torch.no_grad():
                single = ours(input_ids=ids[row:row + 1]).logits
        assert (mixed[row:row + 1] - single).abs().max() < 1e-4
    gen = ours.generate(input_ids=ids, adapter_names=names, max_new_tokens=3, do_sample=False)
    assert gen.shape == (4, ids.shape[1] + 3)
    ours.train()
    with pytest.raises(ValueError, match="training mode"):
        ours(input_ids=ids, adapter_names=names)


def test_mixed_batch_gives_each_row_its_own_adapters_classifier_head_as_peft(minilm, tmp_path):
    """SEQ_CLS adapters save their head (`modules_to_save`); in a mixed batch each row uses its own adapter's copy
    of it, the base rows the original head."""
    inputs = minilm_inputs()
    ids, mask = torch.cat([inputs["input_ids"]] * 2), torch.cat([inputs["attention_mask"]] * 2)
    names = ["b", "a", "__base__", "b"]
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        model = peftray.get_peft_model(minilm(), peftray.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=[
            "query", "value"], init_lora_weights=False))
        with torch.no_grad():
            for p in model.base_model.model.classifier.modules_to_save["default"].parameters():
                p.normal_(0, 1.0)  # a trained head differs from the base's
        model.save_pretrained(tmp_path / name)
    ours = peftray.PeftModel.from_pretrained(minilm(), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    ref = peft.PeftModel.from_pretrained(minilm(), tmp_path / "a", adapter_name="a")
    ref.load_adapter(tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        mixed = ours(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        torch.testing.assert_close(mixed, ref(input_ids=ids, attention_mask=mask, adapter_names=names).logits,
                                   atol=1e-5, rtol=1e-5)
        for row, name in enumerate(names):
            one = {"input_ids": ids[row:row + 1], "attention_mask": mask[row:row + 1]}
            if name == "__base__":
                with ours.disable_adapter():
                    single = ours(**one).logits
            else:
                ours.set_adapter(name)
                single = ours(**one).logits
            torch.testing.assert_close(mixed[row:row + 1], single, atol=1e-5, rtol=1e-5)
    assert (mixed[1] - mixed[3]).abs().max() > 0.1  # the same text under two adapters (and heads)


def test_mixed_batch_follows_weight_changes(llama):
    """The stacked A/B weights of mixed batches are cached; an in-place update (an optimizer step) and a replaced
    tensor must both show in the next mixed forward."""
    model = _lora(llama, name="a")
    torch.manual_seed(5)
    model.add_adapter("b", peftray.LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=TARGETS,
                                              init_lora_weights=False))
    model.eval()
    ids = torch.cat([llama_inputs()["input_ids"]] * 2)[:2]
    names = ["a", "b"]

    def check_rows_equal_single():
        with torch.no_grad():
            mixed = model(input_ids=ids, adapter_names=names).logits
            for row, name in enumerate(names):
                model.set_adapter(name)
                torch.testing.assert_close(mixed[row:row + 1], model(input_ids=ids[row:row + 1]).logits,
                                           rtol=1e-4, atol=1e-4)
        return mixed

    first = check_rows_equal_single()
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.lora_B["a"].weight.mul_(3.0)
    second = check_rows_equal_single()
    assert (second[0] - first[0]).abs().max() > 1e-3 and torch.equal(second[1], first[1])
    q_proj.lora_A["b"].weight = torch.nn.Parameter(torch.randn_like(q_proj.lora_A["b"].weight))
    third = check_rows_equal_single()
    assert (third[1] - second[1]).abs().max() > 1e-3


def test_training_steps_equal_peft(llama):
    """Same init, same data: the fused LoRA path gives PEFT's losses and gradients (dropout 0)."""
    inputs = llama_inputs()
    losses = {}
    for lib in (peft, peftray):
        torch.manual_seed(0)
        cfg = lib.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear", init_lora_weights="gaussian")
        model = lib.get_peft_model(llama(), cfg)
        torch.manual_seed(1)
        for n, p in model.named_parameters():  # make B non-zero so every gradient path is exercised
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses[lib.__name__] = []
        for _ in range(5):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[lib.__name__].append(loss.item())
    assert max(abs(a - b) for a, b in zip(losses["peft"], losses["peftray"])) < 1e-4
    assert losses["peftray"][-1] < losses["peftray"][0]


def test_causal_lm_loss_is_fused_with_the_same_loss_and_gradients(llama):
    """PeftModel computes a causal LM's loss with peftray.ops.loss (its [tokens, vocab] buffer shows it ran),
    equal to the model's own loss function; a loss function the user set is left alone."""
    from peftray.ops import loss as loss_ops

    model = _lora(llama)
    model.train()
    inputs = llama_inputs()
    labels = inputs["input_ids"].clone()
    labels[:, :2] = -100
    results = {}
    for fused in (True, False):
        model.use_fused_loss = fused
        loss_ops._POOL.release()
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        assert (loss_ops._POOL._buffer is not None) is fused
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[fused] = (loss.detach(), grads)
        assert "_loss_function" not in vars(model.get_base_model())
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-7)

    model.use_fused_loss = True
    model.get_base_model().loss_function = lambda logits, labels, vocab_size, **kw: logits.sum() * 0 + 42.0
    assert float(model(**inputs, labels=labels).loss) == 42.0


def test_qlora_on_4bit_base_matches_peft(tiny_model):
    """LoRA on bitsandbytes Linear4bit layers (NF4, CPU): same outputs as PEFT, merge dequantises."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def load():
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=q).eval()

    inputs = llama_inputs()
    kw = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    ours = peftray.get_peft_model(load(), peftray.LoraConfig(**kw))
    torch.manual_seed(0)
    ref = peft.get_peft_model(load(), peft.LoraConfig(**kw))
    assert type(ours.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    ours.set_adapter_state_dict(peft.get_peft_model_state_dict(ref), "default")
    out = logits(ours, inputs)
    assert (out - logits(ref, inputs)).abs().max() < 1e-5
    with ours.disable_adapter():
        assert (out - logits(ours, inputs)).abs().max() > 1e-3
    # merging dequantises, adds B A and requantises to NF4 (lossy), exactly as PEFT does
    merged, ref_merged = ours.merge_and_unload(), ref.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert (logits(merged, inputs) - logits(ref_merged, inputs)).abs().max() < 1e-4


def test_mixed_batch_with_dora_and_embedding_adapters_matches_per_row(llama, tmp_path):
    """DoRA and embedding LoRA take the per-segment path in mixed batches; rows still equal single-adapter runs."""
    kinds = {"dora": dict(target_modules=["q_proj", "v_proj"], use_dora=True),
             "emb": dict(target_modules=["embed_tokens", "o_proj"]),
             "plain": dict(target_modules=["q_proj", "down_proj"], r=8)}
    model = None
    for seed, (name, kw) in enumerate(kinds.items()):
        torch.manual_seed(seed)
        cfg = peftray.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **{"r": 4, **kw})
        peftray.get_peft_model(llama(), cfg).save_pretrained(tmp_path / name)
        if model is None:
            model = peftray.PeftModel.from_pretrained(llama(), tmp_path / name, adapter_name=name)
        else:
            model.load_adapter(tmp_path / name, adapter_name=name)
    ids = torch.cat([llama_inputs()["input_ids"]] * 2)
    names = ["emb", "dora", "__base__", "plain"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        with torch.no_grad(), (model.disable_adapter() if name == "__base__" else _active(model, name)):
            single = model(input_ids=ids[row:row + 1]).logits
        assert (mixed[row:row + 1] - single).abs().max() < 1e-4, name
    # generate with per-row adapters = generating each row with its adapter alone
    gen = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    for row, name in enumerate(names):
        with _active(model, name) if name != "__base__" else model.disable_adapter():
            alone = model.generate(input_ids=ids[row:row + 1], max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert torch.equal(gen[row:row + 1], alone), name


class _active:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.model.set_adapter(self.name)

    def __exit__(self, *exc):
        return False
