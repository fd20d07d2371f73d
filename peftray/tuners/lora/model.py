"""`LoraModel`: injects LoRA layers into a transformers model (also DoRA and QLoRA on 4-bit layers)."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from peftray.errors import AdapterFormatError, ConfigError
from peftray.tuners.lora.layer import Embedding, Linear, LoraLayer
from peftray.tuners.tuner import BaseTuner

# PEFT's defaults when target_modules is not given (same values as HF PEFT for these model types).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"], "falcon": ["query_key_value"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "t5": ["q", "v"], "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    # not in HF PEFT's table (it asks for target_modules); transformers >= 5 names ViT's projections so (4.x: query, value)
    "vit": ["q_proj", "v_proj"],
}


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern matching the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


class LoraModel(BaseTuner):
    """The LoRA tuner: `model` with LoRA layers in the targeted modules."""

    default_targets = DEFAULT_TARGETS

    def _create_and_replace(self, config, adapter_name, target, key, init_weights) -> None:
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, r, alpha, config, init_weights)
            return
        kind = type(target).__name__
        if isinstance(target, nn.Embedding):
            new = Embedding(target)
        elif isinstance(target, nn.Linear) or kind == "Linear4bit":
            if config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out=True but the target is nn.Linear; setting fan_in_fan_out=False.")
                config.fan_in_fan_out = False
            new = Linear(target)
        elif kind == "Conv1D":
            if not config.fan_in_fan_out:
                warnings.warn("the target is a Conv1D (weights stored [in, out]); setting fan_in_fan_out=True.")
                config.fan_in_fan_out = True
            new = Linear(target, fan_in_fan_out=True)
        else:
            raise ConfigError(f"target module `{key}` is a {kind}; LoRA supports nn.Linear, nn.Embedding, Conv1D and "
                              "bitsandbytes Linear4bit. Remove it from target_modules.")
        new.update_layer(adapter_name, r, alpha, config, init_weights)
        self._replace(key, new)

    def _apply_bias_trainability(self, names: list[str], trainable: bool) -> None:
        bias = getattr(self.peft_config.get(names[0]), "bias", "none")
        if bias == "all":
            for name, p in self.model.named_parameters():
                if "bias" in name and ".modules_to_save." not in name and ".original_module." not in name:
                    p.requires_grad_(trainable)
        elif bias == "lora_only":
            for module in self.model.modules():
                if isinstance(module, LoraLayer) and getattr(module.base_layer, "bias", None) is not None:
                    module.base_layer.bias.requires_grad_(trainable)

    def _bias_names(self, adapter_name: str) -> list[str]:
        bias = getattr(self.peft_config.get(adapter_name), "bias", "none")
        if bias == "all":
            return [n for n, _ in self.model.named_parameters()
                    if "bias" in n and ".modules_to_save." not in n and ".original_module." not in n]
        if bias == "lora_only":
            return [f"{path}.base_layer.bias" for path, m in self.model.named_modules()
                    if isinstance(m, LoraLayer) and getattr(m.base_layer, "bias", None) is not None]
        return []

    def _embedding_names(self, adapter_name: str) -> list[str]:
        # HF PEFT ("save_embedding_layers='auto'") saves the full base embedding / output head weights when they
        # are LoRA targets, so an adapter trained on a resized vocabulary carries them along.
        targets = self.peft_config[adapter_name].target_modules
        if isinstance(targets, str) or not any(t in EMBEDDING_LAYER_NAMES for t in targets or ()):
            return []
        return [n for n, _ in self.model.named_parameters()
                if any(n in (f"{e}.base_layer.weight", f"{e}.weight") or n.endswith((f".{e}.base_layer.weight",
                       f".{e}.weight")) for e in EMBEDDING_LAYER_NAMES if e in targets)]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict(adapter_name)
        params = dict(self.model.named_parameters())
        for name in self._bias_names(adapter_name) + self._embedding_names(adapter_name):
            out[name] = params[name].detach()
        return out

    def _load_extra_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        params = dict(self.model.named_parameters())
        for key in [k for k in state if k.endswith(("bias", "weight")) and k in params]:
            t = state.pop(key)
            if tuple(t.shape) != tuple(params[key].shape):
                raise AdapterFormatError(f"tensor `{prefix}{key}` has shape {tuple(t.shape)} but the base model needs "
                                  f"{tuple(params[key].shape)}.")
            with torch.no_grad():
                params[key].copy_(t)
