"""Mixed precision: every tuner path under torch.autocast (bf16, fp16) on fp32 and half-precision bases, with
HF PEFT under the same autocast as the reference; adapter weights on half-precision bases are float32 by default."""

from __future__ import annotations

import peft
import pytest
import torch

import peftray
from tuner_helpers import llama_inputs

TARGETS = ["q_proj", "v_proj", "down_proj"]
METHODS = [
    ("lora", "LoraConfig", dict(r=4, target_modules=TARGETS, init_lora_weights=False)),
    ("lora-dropout", "LoraConfig", dict(r=4, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.1)),
    ("lora-embedding", "LoraConfig", dict(r=4, target_modules=["embed_tokens", "o_proj"], init_lora_weights=False)),
    ("dora", "LoraConfig", dict(r=4, target_modules=TARGETS, use_dora=True, init_lora_weights=False)),
    ("ia3", "IA3Config", dict(init_ia3_weights=False)),
    ("prompt-tuning", "PromptTuningConfig", dict(num_virtual_tokens=3)),
    ("prefix-tuning", "PrefixTuningConfig", dict(num_virtual_tokens=3)),
    ("p-tuning", "PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=16)),
    ("ln-tuning", "LNTuningConfig", dict()),  # copies of the norms: they keep the base dtype, as in HF PEFT
]
# (base dtype, autocast dtype): what Trainer/Accelerate/TRL run with bf16=True or fp16=True
PRECISIONS = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)]


def _load(tiny_model, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)


def _loss_and_grads(model, autocast_dtype):
    ids = llama_inputs()["input_ids"]
    model.train()
    torch.manual_seed(7)  # the same dropout masks on both sides
    with torch.autocast("cpu", dtype=autocast_dtype):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}
    return loss.double(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("base_dtype,amp_dtype", PRECISIONS, ids=["fp32-base-bf16", "bf16-base-bf16", "fp32-base-fp16"])
@pytest.mark.parametrize("method", METHODS, ids=[m[0] for m in METHODS])
def test_forward_backward_under_autocast_match_peft(method, base_dtype, amp_dtype, tiny_model):
    _, cls_name, kwargs = method
    config = dict(kwargs, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    ref = peft.get_peft_model(_load(tiny_model, base_dtype), getattr(peft, cls_name)(**config))
    ours = peftray.get_peft_model(_load(tiny_model, base_dtype), getattr(peftray, cls_name)(**config))
    # same trainable tensors, in the same dtypes (float32 on a bf16 base, as HF PEFT's autocast_adapter_dtype)
    trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    ref_trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert {n: p.dtype for n, p in trainable.items()} == {n: p.dtype for n, p in ref_trainable.items()}
    with torch.no_grad():  # the reference's weights (prompt encoders too: MLP/LSTM before folding)
        for name, param in trainable.items():
            param.copy_(ref_trainable[name])

    ref_loss, ref_grads = _loss_and_grads(ref, amp_dtype)
    loss, grads = _loss_and_grads(ours, amp_dtype)
    # half-precision tolerance: bf16 keeps 8 bits of mantissa, fp16 11; the orders of operations differ
    tol = 3e-2 if amp_dtype == torch.bfloat16 or base_dtype == torch.bfloat16 else 5e-3
    assert abs(float(loss.detach() - ref_loss.detach())) <= tol * abs(float(ref_loss.detach()))
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        assert _rel(grads[name], ref_grads[name]) < 4 * tol, name


@pytest.mark.parametrize("cls_name,kwargs", [("LoraConfig", dict(target_modules=TARGETS, use_dora=True)),
                                             ("IA3Config", {})], ids=["dora", "ia3"])
@pytest.mark.parametrize("upcast", [True, False])
def test_adapter_dtype_on_a_bf16_base_follows_autocast_adapter_dtype(cls_name, kwargs, upcast, tiny_model):
    config = dict(kwargs, task_type="CAUSAL_LM")
    ours = peftray.get_peft_model(_load(tiny_model, torch.bfloat16), getattr(peftray, cls_name)(**config),
                                  autocast_adapter_dtype=upcast)
    ref = peft.get_peft_model(_load(tiny_model, torch.bfloat16), getattr(peft, cls_name)(**config),
                              autocast_adapter_dtype=upcast)
    dtypes = {n: p.dtype for n, p in ours.named_parameters() if p.requires_grad}
    assert dtypes == {n: p.dtype for n, p in ref.named_parameters() if p.requires_grad}
    assert set(dtypes.values()) == {torch.float32 if upcast else torch.bfloat16}
    ids = llama_inputs()["input_ids"]
    ours(input_ids=ids, labels=ids).loss.backward()  # no autocast: the layers cast between the two dtypes
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in ours.parameters() if p.requires_grad)


def test_mixed_adapter_batch_under_autocast_matches_peft(tiny_model, tmp_path):
    """The mixed-adapter kernel (serving path) under autocast bf16, against HF PEFT's per-row adapter_names."""
    ids = torch.cat([llama_inputs()["input_ids"]] * 2)
    names = ["a", "__base__", "b", "a"]
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        cfg = peftray.LoraConfig(task_type="CAUSAL_LM", r=4 * seed, target_modules=TARGETS, init_lora_weights=False)
        peftray.get_peft_model(_load(tiny_model, torch.float32), cfg).save_pretrained(tmp_path / name)
    ours = peftray.PeftModel.from_pretrained(_load(tiny_model, torch.float32), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    ref = peft.PeftModel.from_pretrained(_load(tiny_model, torch.float32), tmp_path / "a", adapter_name="a")
    ref.load_adapter(tmp_path / "b", adapter_name="b")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(input_ids=ids, adapter_names=names).logits.float()
        want = ref(input_ids=ids, adapter_names=names).logits.float()
    assert _rel(got, want) < 3e-2
