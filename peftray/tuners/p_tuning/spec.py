"""The job spec's P-tuning section (`method: p_tuning`); keys are HF PEFT's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftray.tuners.spec import MethodSpec


class PTuningMethod(MethodSpec):
    """P-tuning (`method: p_tuning`): virtual tokens produced by a small prompt encoder."""

    method: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(8, gt=0)
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = Field(None, gt=0)
    encoder_num_layers: int = Field(2, gt=0)
    encoder_dropout: float = Field(0.0, ge=0, lt=1)
