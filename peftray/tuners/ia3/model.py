"""`IA3Model`: injects IA3 scaling layers into a transformers model."""

from __future__ import annotations

import re

from torch import nn

from peftray.errors import ConfigError
from peftray.tuners.ia3.layer import Linear
from peftray.tuners.tuner import BaseTuner

# HF PEFT's defaults per model type: (target_modules, feedforward_modules).
DEFAULTS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "vit": (["k_proj", "v_proj", "mlp.fc2"], ["mlp.fc2"]),  # not in HF PEFT's table; transformers >= 5 names
}


class IA3Model(BaseTuner):
    """The IA3 tuner: `model` with scaling vectors on the targeted modules."""

    default_targets = {k: v[0] for k, v in DEFAULTS.items()}
    shorten_targets = False  # feedforward_modules must stay a subset of target_modules, as in PEFT

    def _prepare_config(self, config) -> None:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if config.feedforward_modules is None:
            if model_type not in DEFAULTS:
                raise ConfigError(f"no default `feedforward_modules` for model type {model_type!r}; set "
                                  "feedforward_modules (a subset of target_modules, or [] for none).")
            config.feedforward_modules = set(DEFAULTS[model_type][1])
        super()._prepare_config(config)

    @staticmethod
    def _is_feedforward(config, key: str) -> bool:
        ff = config.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, key) is not None
        return any(key.endswith(f) for f in ff or ())

    def _create_and_replace(self, config, adapter_name, target, key, init_weights) -> None:
        random_init = not config.init_ia3_weights
        if isinstance(target, Linear):
            target.update_layer(adapter_name, init_weights, random_init)
            return
        kind = type(target).__name__
        if not (isinstance(target, nn.Linear) or kind in ("Conv1D", "Linear4bit")):
            raise ConfigError(f"target module `{key}` is a {kind}; IA3 supports nn.Linear, Conv1D and 4-bit linear "
                              "layers. Remove it from target_modules.")
        if kind == "Conv1D":
            config.fan_in_fan_out = True
        new = Linear(target, is_feedforward=self._is_feedforward(config, key), fan_in_fan_out=kind == "Conv1D")
        new.update_layer(adapter_name, init_weights, random_init)
        self._replace(key, new)
