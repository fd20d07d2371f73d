"""Prompt tuning: soft prompt embeddings."""

from peftray.tuners.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from peftray.tuners.prompt_tuning.model import PromptEmbedding
from peftray.tuners.methods import register_peft_method

register_peft_method("PROMPT_TUNING", PromptTuningConfig, PromptEmbedding)

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]
