"""`PromptEncoder`: P-tuning's virtual-token embeddings passed through an MLP or LSTM encoder.

Saved adapters hold the encoder's output (`prompt_embeddings`); a loaded adapter (inference mode) has no encoder
and uses those embeddings directly, as HF PEFT does.
"""

from __future__ import annotations

import torch
from torch import nn

from peftray.tuners.p_tuning.config import PromptEncoderReparameterizationType as Kind


class PromptEncoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens * config.num_transformer_submodules, dim)
        self.has_encoder = not config.inference_mode
        if not self.has_encoder:
            return
        if self.encoder_type == Kind.LSTM:
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(hidden * 2, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if not self.has_encoder:
            return embeds
        if self.encoder_type == Kind.LSTM:
            return self.mlp_head(self.lstm_head(embeds)[0])
        return self.mlp_head(embeds)
