"""Shared helpers for the tuner tests: loading fresh base models and comparing with HF PEFT (the reference)."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*past_key_values.*")


@pytest.fixture
def llama(tiny_model):
    """A function returning a fresh tiny Llama (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model).eval()

    return load


@pytest.fixture
def minilm(minilm_model):
    """A function returning a fresh MiniLM sequence classifier with a seeded (identical) 3-label head."""
    from transformers import AutoModelForSequenceClassification

    def load():
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            return AutoModelForSequenceClassification.from_pretrained(minilm_model, num_labels=3).eval()

    return load
