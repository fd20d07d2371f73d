"""Prefix tuning: deep prompts (key/value prefixes) on every layer."""

from peftray.tuners.prefix_tuning.config import PrefixTuningConfig
from peftray.tuners.prefix_tuning.model import PrefixEncoder
from peftray.tuners.methods import register_peft_method

register_peft_method("PREFIX_TUNING", PrefixTuningConfig, PrefixEncoder)

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]
