"""LayerNorm tuning: trained copies of the model's normalization layers."""

from peftray.tuners.ln_tuning.config import LNTuningConfig
from peftray.tuners.ln_tuning.spec import LNTuningMethod
from peftray.tuners.methods import lazy_attributes, register_peft_method

register_peft_method("LN_TUNING", LNTuningConfig, "peftray.tuners.ln_tuning.model:LNTuningModel",
                     specs=(LNTuningMethod,))
__getattr__ = lazy_attributes(__name__, LNTuningModel="peftray.tuners.ln_tuning.model")  # the tuner imports torch

__all__ = ["LNTuningConfig", "LNTuningMethod", "LNTuningModel"]
