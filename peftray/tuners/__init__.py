"""PEFT methods, one package per method, each registered in `peftray.tuners.methods` on import.

To add a method: a new folder with config.py / model.py (and layer.py for layer-injecting methods) whose
`__init__` calls `register_peft_method(...)`, plus one import line below.
"""

from peftray.tuners import ia3, lora, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401  (registers methods)
from peftray.tuners.config import PeftConfig, PeftType, PromptLearningConfig, TaskType
from peftray.tuners.ia3 import IA3Config, IA3Model
from peftray.tuners.lora import LoraConfig, LoraModel
from peftray.tuners.p_tuning import PromptEncoder, PromptEncoderConfig
from peftray.tuners.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from peftray.tuners.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from peftray.tuners.methods import config_from_dict, get_method, register_peft_method, registered_methods

__all__ = [
    "IA3Config", "IA3Model", "LoraConfig", "LoraModel", "PeftConfig", "PeftType", "PrefixEncoder",
    "PrefixTuningConfig", "PromptEmbedding", "PromptEncoder", "PromptEncoderConfig", "PromptLearningConfig",
    "PromptTuningConfig", "PromptTuningInit", "TaskType", "config_from_dict", "get_method", "register_peft_method",
    "registered_methods",
]
