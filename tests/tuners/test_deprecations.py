"""peftray's own calls use no API its dependencies have deprecated (the suite also errors on deprecation
warnings raised from peftray's modules: see `filterwarnings` in pyproject.toml)."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftray


@pytest.mark.parametrize("base", ["llama", "minilm"])
def test_prefix_tuning_hands_the_prefix_over_as_cache_not_past_key_values(base, llama, minilm):
    # transformers 5 deprecates `past_key_values` (removed in 5.40); a task head that takes only **kwargs
    # (BERT's sequence classifier) must still get `cache`.
    model, task = (llama(), "CAUSAL_LM") if base == "llama" else (minilm(), "SEQ_CLS")
    peft_model = peftray.get_peft_model(model, peftray.PrefixTuningConfig(task_type=task, num_virtual_tokens=3))
    ids = torch.tensor([[5, 6, 7, 8]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids))
        if task == "CAUSAL_LM":
            peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    with peft_model.disable_adapter():
        base_out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    tail = out.logits[:, -ids.shape[1]:] if out.logits.dim() == 3 else out.logits
    assert (tail - base_out.logits).abs().max() > 1e-4  # the prefix reached the attention
