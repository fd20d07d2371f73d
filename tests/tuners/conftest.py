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


def _write_random_model(path, model_cls, config):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model_cls(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5_path(tmp_path_factory):
    """A small random T5 (encoder-decoder) saved once per session."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    return _write_random_model(tmp_path_factory.mktemp("t5") / "tiny-t5", T5ForConditionalGeneration, cfg)


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory):
    """A small random GPT-2 (Conv1D layers, weights stored [in, out]) saved once per session."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return _write_random_model(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2", GPT2LMHeadModel, cfg)


@pytest.fixture
def loaders(llama, minilm, minilm_model, tiny_t5_path, tiny_gpt2_path):
    """base kind -> (function returning a fresh model, inputs, task type)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForTokenClassification

    from tuner_helpers import llama_inputs, minilm_inputs

    def seeded(fn):
        def load():
            with torch.random.fork_rng():
                torch.manual_seed(1234)
                return fn().eval()
        return load

    ids = torch.tensor([[5, 6, 7, 8, 9, 40], [10, 11, 12, 13, 14, 41]])
    return {
        "llama": (llama, llama_inputs(), "CAUSAL_LM"),
        "minilm": (minilm, minilm_inputs(), "SEQ_CLS"),
        "minilm-tokens": (seeded(lambda: AutoModelForTokenClassification.from_pretrained(minilm_model, num_labels=5)),
                          minilm_inputs(), "TOKEN_CLS"),
        "minilm-features": (seeded(lambda: AutoModel.from_pretrained(minilm_model)), minilm_inputs(),
                            "FEATURE_EXTRACTION"),
        "t5": (seeded(lambda: AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_path)),
               {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids[:, :3]},
               "SEQ_2_SEQ_LM"),
        "gpt2": (seeded(lambda: AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)),
                 {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "CAUSAL_LM"),
    }
