"""The job spec's LayerNorm-tuning section (`method: ln_tuning`); keys are HF PEFT's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftray.tuners.spec import MethodSpec


class LNTuningMethod(MethodSpec):
    """LayerNorm tuning (`method: ln_tuning`): trained copies of the model's normalization layers."""

    method: Literal["ln_tuning"] = "ln_tuning"
    target_modules: list[str] | str | None = Field(
        None, description="norm layer names or a regex string; None = the model type's default")
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
