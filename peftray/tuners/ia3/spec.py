"""The job spec's IA3 section (`method: ia3`); keys are HF PEFT's."""

from __future__ import annotations

from typing import Literal

from peftray.tuners.spec import MethodSpec


class IA3Method(MethodSpec):
    """IA3 (`method: ia3`): learned rescaling vectors."""

    method: Literal["ia3"] = "ia3"
    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
