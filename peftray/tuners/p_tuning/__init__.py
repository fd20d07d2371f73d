"""P-tuning: virtual tokens from an MLP or LSTM prompt encoder."""

from peftray.tuners.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftray.tuners.p_tuning.spec import PTuningMethod
from peftray.tuners.methods import lazy_attributes, register_peft_method

register_peft_method("P_TUNING", PromptEncoderConfig, "peftray.tuners.p_tuning.model:PromptEncoder",
                     specs=(PTuningMethod,), serving="prompt")
__getattr__ = lazy_attributes(__name__, PromptEncoder="peftray.tuners.p_tuning.model")  # the tuner imports torch

__all__ = ["PTuningMethod", "PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
