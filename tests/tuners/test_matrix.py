"""Every generic check on every method, with HF PEFT 0.21 as the reference (one row per method/config)."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftray
from tuner_helpers import llama_inputs, logits, read_config

# (id, base model, config class name (same in peft and peftray), kwargs). Random inits make every adapter change
# the output from the start, so "same logits" cannot pass by both sides being the base model.
CASES = [
    ("lora", "llama", "LoraConfig", dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
    ("lora-all-linear-rslora", "llama", "LoraConfig",
     dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True, init_lora_weights=False)),
    ("lora-patterns-layers", "llama", "LoraConfig",
     dict(r=4, target_modules=["q_proj", "k_proj", "down_proj"], rank_pattern={"k_proj": 2},
          alpha_pattern={"down_proj": 32}, layers_to_transform=[1], layers_pattern="layers", init_lora_weights=False)),
    ("lora-embedding", "llama", "LoraConfig", dict(r=4, target_modules=["embed_tokens", "o_proj"],
                                                   init_lora_weights=False)),
    ("dora", "llama", "LoraConfig", dict(r=4, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True,
                                         init_lora_weights=False)),
    ("ia3", "llama", "IA3Config", dict(init_ia3_weights=False)),
    ("prompt-tuning", "llama", "PromptTuningConfig", dict(num_virtual_tokens=3)),
    ("prefix-tuning", "llama", "PrefixTuningConfig", dict(num_virtual_tokens=3)),
    ("prefix-projection", "llama", "PrefixTuningConfig",
     dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)),
    ("p-tuning-mlp", "llama", "PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=16)),
    ("p-tuning-lstm", "llama", "PromptEncoderConfig",
     dict(num_virtual_tokens=3, encoder_hidden_size=16, encoder_reparameterization_type="LSTM")),
    ("seqcls-lora", "minilm", "LoraConfig", dict(r=4, target_modules=["query", "value"], init_lora_weights=False)),
    ("seqcls-dora", "minilm", "LoraConfig", dict(r=4, target_modules=["query", "value"], use_dora=True,
                                                 init_lora_weights=False)),
    ("seqcls-ia3", "minilm", "IA3Config", dict(init_ia3_weights=False)),
    ("seqcls-prompt-tuning", "minilm", "PromptTuningConfig", dict(num_virtual_tokens=3)),
    ("seqcls-p-tuning", "minilm", "PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=16)),
    ("seqcls-lora-bias-all", "minilm", "LoraConfig", dict(r=4, target_modules=["query"], bias="all",
                                                          init_lora_weights=False)),
    ("tokcls-lora", "minilm-tokens", "LoraConfig", dict(r=4, target_modules=["query", "value"],
                                                        init_lora_weights=False)),
    ("tokcls-ia3", "minilm-tokens", "IA3Config", dict(init_ia3_weights=False)),
    ("features-lora", "minilm-features", "LoraConfig", dict(r=4, target_modules="all-linear",
                                                            init_lora_weights=False)),
    ("features-prompt-tuning", "minilm-features", "PromptTuningConfig", dict(num_virtual_tokens=3)),
    ("seq2seq-lora", "t5", "LoraConfig", dict(r=4, init_lora_weights=False)),
    ("seq2seq-ia3", "t5", "IA3Config", dict(init_ia3_weights=False)),
    ("gpt2-conv1d-lora", "gpt2", "LoraConfig", dict(r=4, fan_in_fan_out=True, init_lora_weights=False)),
    ("gpt2-conv1d-dora", "gpt2", "LoraConfig", dict(r=4, fan_in_fan_out=True, use_dora=True,
                                                    init_lora_weights=False)),
    ("gpt2-ia3", "gpt2", "IA3Config", dict(init_ia3_weights=False)),
    ("ln-tuning", "llama", "LNTuningConfig", dict()),
    ("seqcls-ln-tuning", "minilm", "LNTuningConfig", dict(target_modules=["LayerNorm"],
                                                          modules_to_save=["classifier"])),
]
# bias="all": PEFT also saves odd duplicates of the classifier bias (`classifier.original_module.bias`, ...);
# peftray saves each bias once, so only the tensor-name check is relaxed for that row.
SAME_NAMES_EXCEPT = {"seqcls-lora-bias-all"}
# LN tuning starts as an exact copy of the base norms and has no random init: these rows add the same kind of
# noise to every trainable tensor on both sides instead.
PERTURB = {"ln-tuning", "seqcls-ln-tuning"}


def _perturb(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_method_matches_peft(case, loaders, tmp_path):
    name, base, cls_name, kwargs = case
    load, inputs, task = loaders[base]
    kwargs = dict(kwargs, task_type=task)
    torch.manual_seed(0)
    ours = peftray.get_peft_model(load(), getattr(peftray, cls_name)(**kwargs))
    ref = peft.get_peft_model(load(), getattr(peft, cls_name)(**kwargs))
    if name in PERTURB:
        _perturb(ours)
        _perturb(ref)

    # same trainable-parameter counts as peft
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()

    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    # adapter_config.json: the same fields and values (peft_version aside) and the same tensor names/shapes
    assert read_config(tmp_path / "ours") == read_config(tmp_path / "ref")
    ours_sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ref_sd = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    if name in SAME_NAMES_EXCEPT:
        assert set(ours_sd) <= set(ref_sd)
    else:
        assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}

    ours_out = logits(ours, inputs)
    seq = inputs["input_ids"].shape[1]
    tail = ours_out[:, -seq:] if ours_out.dim() == 3 else ours_out  # prompt methods add virtual positions
    with ours.disable_adapter():  # the adapter really changes the output, and disabling restores the base
        assert (tail - logits(ours, inputs)).abs().max() > 1e-3
        assert torch.allclose(logits(ours, inputs), logits(load(), inputs), atol=1e-6)

    # peftray-saved adapter in peft: same logits
    ref_loaded = peft.PeftModel.from_pretrained(load(), tmp_path / "ours")
    assert (logits(ref_loaded, inputs) - ours_out).abs().max() < 1e-5
    # peft-saved adapter in peftray: same logits as peft
    ours_loaded = peftray.PeftModel.from_pretrained(load(), tmp_path / "ref")
    assert (logits(ours_loaded, inputs) - logits(ref, inputs)).abs().max() < 1e-5
    # peftray round trip
    again = peftray.PeftModel.from_pretrained(load(), tmp_path / "ours")
    assert (logits(again, inputs) - ours_out).abs().max() < 1e-6
    assert again.get_nb_trainable_parameters()[0] == 0  # loaded for inference: frozen
    assert peftray.PeftModel.from_pretrained(load(), tmp_path / "ours", is_trainable=True) \
        .get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("cls_name", ["LoraConfig", "IA3Config", "PromptTuningConfig", "PrefixTuningConfig",
                                      "PromptEncoderConfig"])
def test_generate_is_greedy_decoding_of_the_adapted_model(cls_name, llama, tmp_path):
    """generate() (passthrough, virtual tokens, KV prefix) = step-by-step argmax of the PEFT reference's forward."""
    kwargs = dict(task_type="CAUSAL_LM")
    kwargs.update({"LoraConfig": dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                   "IA3Config": dict(init_ia3_weights=False)}.get(cls_name, dict(num_virtual_tokens=3)))
    torch.manual_seed(0)
    ref = peft.get_peft_model(llama(), getattr(peft, cls_name)(**kwargs)).eval()
    ref.save_pretrained(tmp_path)
    ours = peftray.PeftModel.from_pretrained(llama(), tmp_path).eval()
    ids = llama_inputs()["input_ids"]
    expected = ids
    for _ in range(4):
        with torch.no_grad():
            last = ref(input_ids=expected, attention_mask=torch.ones_like(expected)).logits[:, -1]
        last[:, ref.config.eos_token_id] = float("-inf")  # min_new_tokens=4 below forbids eos the same way
        step = last.argmax(-1)
        expected = torch.cat([expected, step[:, None]], 1)
    out = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                        do_sample=False)
    assert torch.equal(out, expected)


def test_prompt_tuning_text_init_uses_the_tokenizer_like_peft(tiny_model, llama):
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
                  prompt_tuning_init_text="Classify the review:", tokenizer_name_or_path=str(tiny_model))
    ours = peftray.get_peft_model(llama(), peftray.PromptTuningConfig(**kwargs))
    ref = peft.get_peft_model(llama(), peft.PromptTuningConfig(**kwargs))
    got = ours.get_adapter_state_dict()["prompt_embeddings"]
    assert torch.equal(got, peft.get_peft_model_state_dict(ref)["prompt_embeddings"])
    # the text's token embeddings, repeated to fill 7 virtual tokens
    ids = peft_tokenizer_ids(tiny_model, "Classify the review:")
    ids = (ids * 7)[:7]
    assert torch.equal(got, llama().get_input_embeddings().weight[ids].detach())


def peft_tokenizer_ids(path, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)(text)["input_ids"]


def test_peftray_imports_neither_peft_nor_services():
    import subprocess
    import sys

    code = ("import sys, peftray, peftray.tuners, peftray.peft_model, peftray.adapters; "
            "bad = [m for m in ('peft', 'ray', 'mlflow', 'boto3', 's3fs') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
