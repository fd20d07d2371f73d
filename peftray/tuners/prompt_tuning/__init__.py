"""Prompt tuning: soft prompt embeddings."""

from peftray.tuners.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from peftray.tuners.prompt_tuning.spec import PromptTuningMethod
from peftray.tuners.methods import lazy_attributes, register_peft_method

register_peft_method("PROMPT_TUNING", PromptTuningConfig, "peftray.tuners.prompt_tuning.model:PromptEmbedding",
                     specs=(PromptTuningMethod,), serving="prompt")
__getattr__ = lazy_attributes(__name__, PromptEmbedding="peftray.tuners.prompt_tuning.model")  # the tuner imports torch

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit", "PromptTuningMethod"]
