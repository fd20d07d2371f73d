"""Prompt-learning plumbing shared by prompt tuning, prefix tuning and P-tuning: building the prompt
encoder for a model, producing the virtual prompts / key-value prefixes, and feeding them to the model.

Prefixes are handed to the model as a transformers `DynamicCache` (the current cache API), one layer per
transformer layer, with key/value heads = the model's key/value heads (GQA included).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import torch
from torch import nn

from peftray.errors import ConfigError
from peftray.tuners.config import PeftType, TaskType, fill_from_model_config
from peftray.tuners.methods import get_method


def make_prompt_encoder(model: nn.Module, config: Any, loading: bool = False) -> nn.Module:
    """Fill the config from the model and build the method's encoder (frozen base model assumed).

    A loaded adapter holds the encoder's *output* (`prompt_embeddings`), so when `loading` the encoder is built
    without its MLP/LSTM/projection even if the adapter is loaded trainable: training continues on the
    saved embeddings directly instead of pushing them through a freshly initialised encoder.
    """
    if config.task_type == TaskType.SEQ_2_SEQ_LM:
        raise ConfigError(f"{config.peft_type.value} with task_type SEQ_2_SEQ_LM is not supported by peftray; "
                          "use LoRA or IA3 for encoder-decoder models.")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    fill_from_model_config(config, model.config)
    _, encoder_cls = get_method(config.peft_type)
    if loading and not config.inference_mode:
        config = copy.copy(config)
        config.inference_mode = True
    if config.peft_type == PeftType.PROMPT_TUNING:
        encoder = encoder_cls(config, model.get_input_embeddings())
    else:
        encoder = encoder_cls(config)
    return encoder.to(model.get_input_embeddings().weight.device)


def prompt_embedding_to_save(encoder: nn.Module, config: Any) -> torch.Tensor:
    """What PEFT saves as `prompt_embeddings`: the encoder's output for every virtual token."""
    n = config.num_virtual_tokens
    if config.peft_type != PeftType.PREFIX_TUNING:
        n *= config.num_transformer_submodules
    tokens = torch.arange(n, device=encoder.embedding.weight.device).unsqueeze(0)
    with torch.no_grad():
        return encoder(tokens)[0].detach().cpu()


def virtual_prompts(encoder: nn.Module, config: Any, batch_size: int) -> torch.Tensor:
    """[batch, virtual tokens, token_dim] prompts for prompt tuning and P-tuning."""
    if config.inference_mode:
        prompts = encoder.embedding.weight
    else:  # encode one copy and repeat it (cheaper than encoding batch_size copies)
        n = config.num_virtual_tokens * config.num_transformer_submodules
        prompts = encoder(torch.arange(n, device=encoder.embedding.weight.device).unsqueeze(0))[0]
    return prompts.unsqueeze(0).expand(batch_size, -1, -1)


def prefix_cache(encoder: nn.Module, config: Any, batch_size: int, dtype: torch.dtype):
    """A DynamicCache holding the prefix keys/values of every layer: [batch, kv_heads, virtual tokens, head_dim]."""
    from transformers import DynamicCache

    n = config.num_virtual_tokens
    if config.inference_mode:
        flat = encoder.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)
    else:
        tokens = torch.arange(n, device=encoder.embedding.weight.device).unsqueeze(0).expand(batch_size, -1)
        flat = encoder(tokens)
    return DynamicCache(prefix_key_values(flat.to(dtype), config))


def prefix_key_values(flat: torch.Tensor, config: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key, value), each [batch, kv heads, virtual tokens, head_dim], from the prefix encoder's output
    [batch, virtual tokens, num_layers * 2 * token_dim] (PEFT's layout: layer-major, key before value)."""
    batch, n = flat.shape[:2]
    heads = config.num_attention_heads
    kv = flat.reshape(batch, n, config.num_layers * 2, heads, config.token_dim // heads).permute(2, 0, 3, 1, 4)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(config.num_layers)]


def cache_kwarg(model: nn.Module) -> str:
    """Name of the forward argument that takes a KV cache: `cache` in transformers 5, `past_key_values` before.

    Asked of the inner transformer (`model.base_model`): a task head such as BERT's sequence classifier takes
    only `**kwargs` and hands them on, and `past_key_values` is deprecated there (removed in transformers 5.40).
    """
    inner = getattr(model, "base_model", model)
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if mask is None:
        return None
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


def drop_position_ids(kwargs: dict[str, Any], config: Any, remove_token_type_ids: bool) -> None:
    """PEFT's handling of position/token type ids with virtual tokens."""
    if kwargs.get("position_ids") is not None:
        if config.peft_type == PeftType.PREFIX_TUNING:
            kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
        else:
            warnings.warn("position ids are not supported with virtual tokens; ignoring them.")
            kwargs["position_ids"] = None
    if remove_token_type_ids and kwargs.get("token_type_ids") is not None:
        warnings.warn("token type ids are not supported with virtual tokens; ignoring them.")
        kwargs["token_type_ids"] = None
