"""A peftray model in TRL's SFTTrainer and DPOTrainer (bf16 autocast on CPU), saving the adapter in HF PEFT's format."""

from __future__ import annotations

import os

import peft
import torch
import trl  # a test-only dependency (the `test` extra): missing, it fails, not skips

import peftray
from integration_helpers import TEXTS, adapter_weights, saved_adapter_matches


def _common(out):
    return dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                use_cpu=True, bf16=True, save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)


def test_sft_trainer_trains_and_saves_the_adapter(lora_model, base_model, tokenizer, tmp_path):
    from datasets import Dataset

    model = lora_model()
    before = adapter_weights(model)
    args = trl.SFTConfig(**_common(tmp_path / "run"), max_length=16)
    trainer = peftray.peft_trainer(trl.SFTTrainer)(model=model, args=args, processing_class=tokenizer,
                                                  train_dataset=Dataset.from_dict({"text": TEXTS}))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = adapter_weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in before if ".lora_B." in n)
    trainer.save_model(str(tmp_path / "final"))
    assert "model.safetensors" not in os.listdir(tmp_path / "final")
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    assert saved_adapter_matches(model, peft.PeftModel.from_pretrained(base_model(), tmp_path / "final"),
                                 tmp_path / "final", ids)


def _pairs():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"Say something about this: {t}.", "chosen": " It is lovely, thank you.",
                               "rejected": " No."} for t in TEXTS])


def test_dpo_trainer_takes_the_disabled_adapter_as_reference_like_hf_peft(lora_model, base_model, tokenizer,
                                                                         tmp_path):
    """TRL's DPOTrainer on a peftray model: no second model is loaded (the reference is the policy with its adapter
    off, as TRL does for HF PEFT), and the losses and rewards equal HF PEFT's run from the same adapter (fp32)."""
    model = lora_model()
    model.save_pretrained(tmp_path / "init")
    hf = peft.PeftModel.from_pretrained(base_model(), tmp_path / "init", is_trainable=True)
    history = {}
    for name, policy, cls in (("peftray", model, peftray.peft_trainer(trl.DPOTrainer)), ("peft", hf, trl.DPOTrainer)):
        args = trl.DPOConfig(**{**_common(tmp_path / name), "bf16": False}, beta=0.1, max_length=32)
        trainer = cls(model=policy, args=args, processing_class=tokenizer, train_dataset=_pairs())
        if name == "peftray":
            ref_tensors = {p.data_ptr() for p in trainer.ref_model._policy.parameters()}
            assert trainer.ref_model._policy is model  # the policy itself: no base model loaded a second time
            assert {p.data_ptr() for p in model.parameters()} == ref_tensors
        trainer.train()
        history[name] = [{k: h[k] for k in ("loss", "rewards/chosen", "rewards/rejected")}
                         for h in trainer.state.log_history if "loss" in h]
        if name == "peftray":
            trainer.save_model(str(tmp_path / "final"))
    assert len(history["peftray"]) == 3
    for ours, theirs in zip(history["peftray"], history["peft"], strict=True):
        for key in ours:
            assert abs(ours[key] - theirs[key]) <= 1e-5 * max(1.0, abs(theirs[key])), (key, ours, theirs)
    assert history["peftray"][-1]["rewards/chosen"] != 0.0  # the adapter moved away from the reference
    assert "model.safetensors" not in os.listdir(tmp_path / "final")
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    assert saved_adapter_matches(model, peft.PeftModel.from_pretrained(base_model(), tmp_path / "final"),
                                 tmp_path / "final", ids)
