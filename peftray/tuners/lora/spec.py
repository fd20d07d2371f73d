"""The job spec's LoRA sections: `method: lora` (with `use_dora`) and `method: dora`; keys are HF PEFT's."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from peftray.tuners.spec import MethodSpec


class _LoraFields(MethodSpec):
    r: int = Field(8, gt=0, description="rank of the update")
    lora_alpha: float = Field(8, gt=0, description="scaling numerator: scale = lora_alpha / r")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(
        None, description="module names, 'all-linear', or a regex string; None = the model type's default")
    exclude_modules: list[str] | str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    fan_in_fan_out: bool = False
    text_encoder_target_modules: list[str] | None = Field(
        None, min_length=1, description="text_to_image: also put a LoRA (same r, lora_alpha, dropout) on these modules of the "
                          "pipeline's CLIP text encoder, e.g. [q_proj, k_proj, v_proj, out_proj], trained with the "
                          "UNet's; None = the text encoder stays frozen")
    # the text encoder's targets configure a second adapter (peftray.train.model.wrap_text_encoder)
    spec_only_fields: ClassVar[frozenset[str]] = frozenset({"text_encoder_target_modules"})


class LoraMethod(_LoraFields):
    """LoRA (`method: lora`); `use_dora: true` turns it into DoRA."""

    method: Literal["lora"] = "lora"
    use_dora: bool = False

    @classmethod
    def describes(cls, config: dict[str, Any]) -> bool:
        return not config.get("use_dora")


class DoraMethod(_LoraFields):
    """DoRA (`method: dora`): LoRA with a learned magnitude vector (HF PEFT: LoRA with use_dora=True)."""

    method: Literal["dora"] = "dora"

    @classmethod
    def describes(cls, config: dict[str, Any]) -> bool:
        return bool(config.get("use_dora"))

    def peft_kwargs(self, base_ref: str | None = None) -> dict[str, Any]:
        return {**super().peft_kwargs(base_ref), "use_dora": True}
