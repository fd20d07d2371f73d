"""`LNTuningModel`: replaces the targeted norm layers by a frozen original plus one trainable copy per adapter.

As in HF PEFT, nothing is folded into weights: merging swaps the adapter's copy in as the base layer (and the
original into the adapter's place), unmerging swaps them back, so only one adapter can be merged or active.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from peftray.errors import ConfigError
from peftray.tuners.layers import AdapterLayer
from peftray.tuners.tuner import BaseTuner

# HF PEFT's defaults when target_modules is not given (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"], "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"], "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"], "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"], "qwen3": ["post_attention_layernorm"],
}


class LNTuningLayer(AdapterLayer):
    """A norm layer (`base_layer`, frozen) and its per-adapter trainable copies (`ln_tuning_layers`)."""

    adapter_layer_names = ("ln_tuning_layers",)
    # The copies must compute in the base's dtype (an fp32 RMSNorm weight would turn bf16 activations into fp32),
    # so they are never upcast; HF PEFT skips its adapter-dtype autocast for LN tuning too.
    cast_adapter_dtype = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()

    def update_layer(self, name: str) -> None:
        self.ln_tuning_layers[name] = copy.deepcopy(self.base_layer)
        self._generation += 1

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        if name not in self.ln_tuning_layers:
            return {}
        return {f"ln_tuning_layers.{k}": p for k, p in self.ln_tuning_layers[name].named_parameters()}

    # --- merging: a swap of modules, not arithmetic on weights ----------------------------------
    def merge(self, names: list[str] | None = None) -> None:
        names = [n for n in (names or self.active_adapters)
                 if n in self.ln_tuning_layers and n not in self.merged_adapters]
        if not names:
            return
        if len(names) > 1:
            raise ConfigError(f"LN tuning merges one adapter at a time, got {names}; merge one of them.")
        self.unmerge()
        self._swap(names[0])
        self.merged_adapters.append(names[0])

    def unmerge(self) -> None:
        if self.merged_adapters:
            self._swap(self.merged_adapters.pop())

    def _swap(self, name: str) -> None:
        self.base_layer, self.ln_tuning_layers[name] = self.ln_tuning_layers[name], self.base_layer

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        active = [a for a in self.active_adapters if a in self.ln_tuning_layers]
        if self.disabled or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise ConfigError(f"LN tuning runs one adapter at a time, got active adapters {active}; "
                              "call set_adapter with one name.")
        return self.ln_tuning_layers[active[0]](x, *args, **kwargs)


class LNTuningModel(BaseTuner):
    """The LN tuning tuner: `model` with a trainable copy of each targeted norm layer."""

    default_targets = DEFAULT_TARGETS

    def _create_and_replace(self, config, adapter_name, target, key, init_weights) -> None:
        # init_weights does not apply: a copy of the base layer is the only start LN tuning has
        if isinstance(target, LNTuningLayer):
            target.update_layer(adapter_name)
            return
        new = LNTuningLayer(target)
        new.update_layer(adapter_name)
        self._replace(key, new)
