"""Fixtures for the Trainer / TRL / Accelerate tests: the tiny Llama, a peftray or HF PEFT LoRA on it, a dataset."""

from __future__ import annotations

import pytest
import torch

from integration_helpers import TARGETS, TEXTS


@pytest.fixture
def lora_model(tiny_model):
    """A function returning a fresh tiny Llama with a LoRA adapter (same seeded init every call), from
    peftray (`lib="peftray"`) or HF PEFT (`lib="peft"`), in the base dtype asked for."""
    from transformers import AutoModelForCausalLM

    def make(lib: str = "peftray", dtype=torch.float32, **kwargs):
        import importlib

        mod = importlib.import_module(lib)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
        config = mod.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=TARGETS, **kwargs)
        torch.manual_seed(0)
        return mod.get_peft_model(base, config)

    return make


@pytest.fixture
def base_model(tiny_model):
    """A function returning a fresh tiny Llama (no adapter)."""
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model)


@pytest.fixture
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture
def lm_dataset(tokenizer):
    """Tokenized causal-LM rows (input_ids, attention_mask, labels) plus the raw `text` column, which the model
    does not take: transformers' Trainer must drop it (remove_unused_columns) and keep the others."""
    from datasets import Dataset

    enc = tokenizer(TEXTS, padding="max_length", max_length=12, truncation=True)
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return Dataset.from_dict({"text": TEXTS, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "labels": labels})
