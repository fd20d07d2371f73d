"""`PromptEmbedding`: the trainable virtual-token embeddings of prompt tuning."""

from __future__ import annotations

import math

import torch
from torch import nn

from peftray.tuners.prompt_tuning.config import PromptTuningInit


class PromptEmbedding(nn.Module):
    """[total virtual tokens, token_dim] embeddings, optionally started from a text's or random tokens' embeddings."""

    def __init__(self, config, word_embeddings: nn.Module) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode:
            return  # weights come from the adapter file
        ids = None
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        elif config.prompt_tuning_init == PromptTuningInit.TEXT:
            ids = _text_token_ids(config, total)
        if ids is not None:
            with torch.no_grad():
                init = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
            self.embedding.weight = nn.Parameter(init)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def _text_token_ids(config, total: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a saved config must never make us run remote code
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if len(ids) < total:  # repeat the text until it covers every virtual token, then cut
        ids = ids * math.ceil(total / len(ids))
    return torch.tensor(ids[:total], dtype=torch.long)
