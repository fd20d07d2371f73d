"""LoRA (with rsLoRA, DoRA and QLoRA on bitsandbytes 4-bit layers)."""

from peftray.tuners.lora.config import LoraConfig
from peftray.tuners.lora.spec import DoraMethod, LoraMethod
from peftray.tuners.methods import lazy_attributes, register_peft_method

register_peft_method("LORA", LoraConfig, "peftray.tuners.lora.model:LoraModel", specs=(LoraMethod, DoraMethod),
                     serving="lora")
__getattr__ = lazy_attributes(__name__, LoraModel="peftray.tuners.lora.model")  # the tuner class imports torch

__all__ = ["DoraMethod", "LoraConfig", "LoraMethod", "LoraModel"]
