"""PEFT methods, one package per method, each registered in `peftray.tuners.methods` on import.

To add a method: a new folder with config.py / spec.py / model.py (and layer.py for layer-injecting methods)
whose `__init__` calls `register_peft_method(...)`, plus one import line below.

Importing this package registers every method without importing torch: the tuner classes (`LoraModel`, ...)
are imported on first use. Every registered method's config and tuner class is an attribute of this package
(and its config class one of `peftray`), found in the table: a new method's classes need no line here.
"""

# Registration order is the order the job spec lists methods in (LoRA, the default, first).
from peftray.tuners import lora, ia3, prompt_tuning, prefix_tuning, p_tuning, ln_tuning  # noqa: F401, I001
from peftray.tuners.config import PeftConfig, PeftType, PromptLearningConfig, TaskType
from peftray.tuners.ia3 import IA3Config
from peftray.tuners.lora import LoraConfig
from peftray.tuners.methods import (
    class_attributes, config_from_dict, get_method, register_peft_method, registered_methods,
)
from peftray.tuners.p_tuning import PromptEncoderConfig
from peftray.tuners.prefix_tuning import PrefixTuningConfig
from peftray.tuners.prompt_tuning import PromptTuningConfig, PromptTuningInit

# Every registered method's config and tuner class by name (`LoraModel`, `LNTuningConfig`), from the table.
__getattr__ = class_attributes(__name__)

__all__ = [
    "IA3Config", "IA3Model", "LoraConfig", "LoraModel", "PeftConfig", "PeftType", "PrefixEncoder",
    "PrefixTuningConfig", "PromptEmbedding", "PromptEncoder", "PromptEncoderConfig", "PromptLearningConfig",
    "PromptTuningConfig", "PromptTuningInit", "TaskType", "config_from_dict", "get_method", "register_peft_method",
    "registered_methods",
]
