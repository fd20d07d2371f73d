"""Prefix tuning: deep prompts (key/value prefixes) on every layer."""

from peftray.tuners.prefix_tuning.config import PrefixTuningConfig
from peftray.tuners.prefix_tuning.spec import PrefixTuningMethod
from peftray.tuners.methods import lazy_attributes, register_peft_method

register_peft_method("PREFIX_TUNING", PrefixTuningConfig, "peftray.tuners.prefix_tuning.model:PrefixEncoder",
                     specs=(PrefixTuningMethod,), serving="prompt")
__getattr__ = lazy_attributes(__name__, PrefixEncoder="peftray.tuners.prefix_tuning.model")  # the tuner imports torch

__all__ = ["PrefixEncoder", "PrefixTuningConfig", "PrefixTuningMethod"]
