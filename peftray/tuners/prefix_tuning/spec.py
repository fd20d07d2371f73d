"""The job spec's prefix-tuning section (`method: prefix_tuning`); keys are HF PEFT's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftray.tuners.spec import MethodSpec


class PrefixTuningMethod(MethodSpec):
    """Prefix tuning (`method: prefix_tuning`): learned key/value prefixes in every layer."""

    method: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(8, gt=0)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(None, gt=0)
