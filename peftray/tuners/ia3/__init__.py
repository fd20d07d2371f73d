"""(IA)^3: learned scaling vectors."""

from peftray.tuners.ia3.config import IA3Config
from peftray.tuners.ia3.spec import IA3Method
from peftray.tuners.methods import lazy_attributes, register_peft_method

register_peft_method("IA3", IA3Config, "peftray.tuners.ia3.model:IA3Model", specs=(IA3Method,))
__getattr__ = lazy_attributes(__name__, IA3Model="peftray.tuners.ia3.model")  # the tuner class imports torch

__all__ = ["IA3Config", "IA3Method", "IA3Model"]
