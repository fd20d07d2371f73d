"""(IA)^3: learned scaling vectors."""

from peftray.tuners.ia3.config import IA3Config
from peftray.tuners.ia3.model import IA3Model
from peftray.tuners.methods import register_peft_method

register_peft_method("IA3", IA3Config, IA3Model)

__all__ = ["IA3Config", "IA3Model"]
