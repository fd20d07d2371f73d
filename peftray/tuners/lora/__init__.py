"""LoRA (with rsLoRA, DoRA and QLoRA on bitsandbytes 4-bit layers)."""

from peftray.tuners.lora.config import LoraConfig
from peftray.tuners.lora.model import LoraModel
from peftray.tuners.methods import register_peft_method

register_peft_method("LORA", LoraConfig, LoraModel)

__all__ = ["LoraConfig", "LoraModel"]
