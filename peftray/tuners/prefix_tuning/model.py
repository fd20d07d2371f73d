"""`PrefixEncoder`: the per-layer key/value prefixes, [num_virtual_tokens, num_layers * 2 * token_dim]."""

from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """An embedding of the flattened prefixes, or (with `prefix_projection`, while training) a small embedding
    followed by a Linear-Tanh-Linear MLP that produces them."""

    def __init__(self, config) -> None:
        super().__init__()
        out_dim = config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, out_dim))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, out_dim)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding(prefix))
        return self.embedding(prefix)
