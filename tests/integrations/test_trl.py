"""A peftray model in TRL's SFTTrainer and DPOTrainer (bf16 autocast on CPU), saving the adapter in HF PEFT's format."""

from __future__ import annotations

import os

import peft
import pytest
import torch

import peftray
from integration_helpers import TEXTS, adapter_weights, saved_adapter_matches

trl = pytest.importorskip("trl")


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
