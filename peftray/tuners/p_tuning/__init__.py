"""P-tuning: virtual tokens from an MLP or LSTM prompt encoder."""

from peftray.tuners.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftray.tuners.p_tuning.model import PromptEncoder
from peftray.tuners.methods import register_peft_method

register_peft_method("P_TUNING", PromptEncoderConfig, PromptEncoder)

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
