"""A peftray model in transformers' `Trainer`: default arguments, adapter-only checkpoints in HF PEFT's format,
resume, best-model reload, gradient checkpointing and bf16 (autocast on CPU) against HF PEFT."""

from __future__ import annotations

import os

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

import peftray
from integration_helpers import adapter_weights


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, data_seed=0,
                disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def _trainer(model, args, data, cls=Trainer):
    return peftray.peft_trainer(cls)(model=model, args=args, train_dataset=data, eval_dataset=data)


def test_trains_with_default_arguments_and_checkpoints_hold_the_adapter_only(lora_model, base_model, lm_dataset,
                                                                           tmp_path):
    model = lora_model()
    before = adapter_weights(model)
    trainer = _trainer(model, _args(tmp_path / "run", save_strategy="steps", save_steps=2), lm_dataset)
    trainer.train()  # default remove_unused_columns: keeps input_ids/attention_mask/labels, drops `text`
    after = adapter_weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in before if ".lora_B." in n)
    checkpoints = sorted(p for p in os.listdir(tmp_path / "run") if p.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    trainer.save_model(str(tmp_path / "final"))
    for folder in [tmp_path / "run" / c for c in checkpoints] + [tmp_path / "final"]:
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}, folder
    # the saved adapter is HF PEFT's format: HF PEFT loads it and computes what the trained model computes
    ref = peft.PeftModel.from_pretrained(base_model(), tmp_path / "final")
    ids = torch.tensor([lm_dataset[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


def test_resume_restores_adapter_optimizer_and_scheduler(lora_model, lm_dataset, tmp_path):
    full = lora_model()
    _trainer(full, _args(tmp_path / "a", save_strategy="steps", save_steps=2), lm_dataset).train()
    resumed = lora_model()  # a fresh adapter: everything must come from checkpoint-2
    trainer = _trainer(resumed, _args(tmp_path / "b"), lm_dataset)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    want, got = adapter_weights(full), adapter_weights(resumed)
    # equal only if the Adam moments and the LR schedule came back too (the adapter alone would differ)
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)


def test_load_best_model_at_end_reloads_the_best_checkpoints_adapter(lora_model, lm_dataset, tmp_path):
    from safetensors.torch import load_file

    model = lora_model()
    args = _args(tmp_path / "run", max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                 save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                 learning_rate=0.3)  # large steps: the losses differ between checkpoints
    trainer = _trainer(model, args, lm_dataset)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and trainer.state.best_metric is not None  # eval_loss was computed (labels found)
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    live = model.get_adapter_state_dict()
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k].detach().cpu()) for k in saved)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_frozen_embeddings(lora_model, lm_dataset, tmp_path, reentrant):
    plain = lora_model()
    _trainer(plain, _args(tmp_path / "plain"), lm_dataset).train()
    ckpt = lora_model()
    args = _args(tmp_path / "ckpt", gradient_checkpointing=True,
                 gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _trainer(ckpt, args, lm_dataset).train()
    want, got = adapter_weights(plain), adapter_weights(ckpt)
    assert all(torch.allclose(got[n], want[n], atol=1e-5) for n in want)  # recomputation changes nothing


def test_bf16_training_matches_peft_under_the_same_autocast(lora_model, lm_dataset, tmp_path):
    losses = {}
    for lib in ("peftray", "peft"):
        model = lora_model(lib, init_lora_weights=False)
        trainer = (_trainer if lib == "peftray" else _plain_trainer)(model, _args(tmp_path / lib, bf16=True),
                                                                     lm_dataset)
        trainer.train()
        losses[lib] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["peftray"]) == 4
    for ours, ref in zip(losses["peftray"], losses["peft"]):
        assert abs(ours - ref) <= 3e-2 * abs(ref)


def _plain_trainer(model, args, data):
    return Trainer(model=model, args=args, train_dataset=data)
