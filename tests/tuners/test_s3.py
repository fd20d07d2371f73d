"""Adapters load from s3:// URIs on the session stack's real S3 (SeaweedFS)."""

from __future__ import annotations

import torch

import peftray
from tuner_helpers import llama_inputs, logits


def test_save_to_and_load_from_s3(stack, llama, unique_name):
    torch.manual_seed(0)
    cfg = peftray.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peftray.get_peft_model(llama(), cfg)
    uri = f"s3://{stack.bucket}/tests/{unique_name}/adapter"
    model.save_pretrained(uri)
    loaded = peftray.PeftModel.from_pretrained(llama(), uri)
    assert (logits(loaded, llama_inputs()) - logits(model, llama_inputs())).abs().max() < 1e-6
