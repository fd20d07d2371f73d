"""The job spec's prompt-tuning section (`method: prompt_tuning`); keys are HF PEFT's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from peftray.tuners.spec import MethodSpec


class PromptTuningMethod(MethodSpec):
    """Prompt tuning (`method: prompt_tuning`): learned virtual-token embeddings."""

    method: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(8, gt=0)
    prompt_tuning_init: Literal["RANDOM", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None

    @model_validator(mode="after")
    def _text_init(self):
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init TEXT needs prompt_tuning_init_text")
        return self

    def peft_kwargs(self, base_ref: str | None = None) -> dict[str, Any]:
        kwargs = super().peft_kwargs(base_ref)
        if self.prompt_tuning_init == "TEXT" and base_ref:
            kwargs["tokenizer_name_or_path"] = base_ref  # the init text is tokenized with the base's tokenizer
        return kwargs
