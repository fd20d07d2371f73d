"""Task-specific `PeftModel` subclasses: how virtual prompts / prefixes enter each kind of transformers head.

For LoRA and IA3 every task is a plain pass-through (the adapters live inside the layers); the subclasses matter
for prompt methods and for SEQ_CLS, which (like HF PEFT) trains and saves the classifier head with the adapter.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from peftray.errors import ConfigError
from peftray.peft_model import CLASSIFIER_NAMES, TASK_CLASSES, PeftModel
from peftray.tuners import prompt_learning as pl
from peftray.tuners.config import PeftConfig, PeftType, TaskType
from peftray.tuners.methods import get_method


def _batch_size(input_ids, inputs_embeds) -> int:
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]


class _PromptTasks(PeftModel):
    """Shared prompt-method forward: prepend virtual tokens (prompt tuning, P-tuning) or pass a KV prefix."""

    prefix_labels = False  # causal LM: the virtual positions get label -100
    keep_token_type_ids = True

    def _prompt_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        cfg = self.active_peft_config
        batch, n = _batch_size(input_ids, inputs_embeds), cfg.num_virtual_tokens
        encoder = self.prompt_encoder[self.active_adapter]
        attention_mask = pl.extend_mask(attention_mask, n)
        pl.drop_position_ids(kwargs, cfg, remove_token_type_ids=not self.keep_token_type_ids)
        if cfg.peft_type == PeftType.PREFIX_TUNING:
            kwargs[pl.cache_kwarg(self.base_model)] = pl.prefix_cache(encoder, cfg, batch, self.base_model.dtype)
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   labels=labels, **kwargs)
        if kwargs.get("token_type_ids") is not None:
            tt = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([torch.zeros(batch, n, dtype=tt.dtype, device=tt.device), tt], 1)
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        if labels is not None and self.prefix_labels:
            labels = torch.cat([torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device), labels], 1)
        prompts = pl.virtual_prompts(encoder, cfg, batch).to(inputs_embeds.dtype)
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model(inputs_embeds=torch.cat([prompts, inputs_embeds], 1), attention_mask=attention_mask,
                               **kwargs)


class PeftModelForCausalLM(_PromptTasks, task_type=TaskType.CAUSAL_LM):
    """Causal language models (`AutoModelForCausalLM`)."""

    prefix_labels = True
    keep_token_type_ids = False

    def _prompt_generate(self, input_ids=None, attention_mask=None, **kwargs):
        cfg = self.active_peft_config
        if input_ids is None:
            raise ConfigError("generate with a prompt method needs input_ids.")
        batch, n = input_ids.shape[0], cfg.num_virtual_tokens
        encoder = self.prompt_encoder[self.active_adapter]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = pl.extend_mask(attention_mask, n)
        if cfg.peft_type == PeftType.PREFIX_TUNING:
            # The prefix is a pre-filled cache of n positions; n placeholder ids stand for them so that
            # generate treats them as already processed and the real prompt starts at position n.
            cache = pl.prefix_cache(encoder, cfg, batch, self.base_model.dtype)
            fill = torch.zeros(batch, n, dtype=input_ids.dtype, device=input_ids.device)
            out = self.base_model.generate(input_ids=torch.cat([fill, input_ids], 1), attention_mask=mask,
                                           **{pl.cache_kwarg(self.base_model): cache}, **kwargs)
            return out[:, n:]
        embeds = self.base_model.get_input_embeddings()(input_ids)
        prompts = pl.virtual_prompts(encoder, cfg, batch).to(embeds.dtype)
        out = self.base_model.generate(inputs_embeds=torch.cat([prompts, embeds], 1), attention_mask=mask, **kwargs)
        return torch.cat([input_ids, out], 1)


class PeftModelForSequenceClassification(_PromptTasks, task_type=TaskType.SEQ_CLS):
    """Sequence classification; the classifier head (`classifier` / `score`) is trained and saved too."""

    classifier_names = CLASSIFIER_NAMES

    def __init__(self, model, peft_config: PeftConfig, adapter_name: str = "default", init_weights: bool = True,
                 autocast_adapter_dtype: bool = True):
        _add_classifier(peft_config, self.classifier_names)
        super().__init__(model, peft_config, adapter_name, init_weights, autocast_adapter_dtype)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, init_weights: bool = True,
                    autocast_adapter_dtype: bool = True) -> None:
        _add_classifier(peft_config, self.classifier_names)  # HF PEFT extends here too (prompt methods: twice)
        super().add_adapter(adapter_name, peft_config, init_weights, autocast_adapter_dtype)


def _add_classifier(config: PeftConfig, names: list[str]) -> None:
    if hasattr(config, "modules_to_save"):
        config.modules_to_save = (list(config.modules_to_save) if config.modules_to_save else []) + names


class PeftModelForTokenClassification(PeftModelForSequenceClassification, task_type=TaskType.TOKEN_CLS):
    """Token classification (the classifier head is trained and saved too)."""


class PeftModelForFeatureExtraction(_PromptTasks, task_type=TaskType.FEATURE_EXTRACTION):
    """Encoders used for embeddings (`AutoModel`)."""

    def _prompt_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs: Any):
        kwargs.pop("labels", None)
        return super()._prompt_forward(input_ids, attention_mask, inputs_embeds, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel, task_type=TaskType.SEQ_2_SEQ_LM):
    """Encoder-decoder LMs (LoRA and IA3; prompt methods are refused for this task)."""


class PeftModelForQuestionAnswering(PeftModelForSequenceClassification, task_type=TaskType.QUESTION_ANS):
    """Extractive question answering (the `qa_outputs` head is trained and saved too)."""

    classifier_names = ["qa_outputs"]


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True) -> PeftModel:
    """Wrap a transformers model with a new, trainable adapter described by `peft_config`.

    As in HF PEFT, adapter weights on a float16/bfloat16 base are float32 (stable updates; autocast or the
    layer casts them for the matmuls); `autocast_adapter_dtype=False` keeps them in the base dtype.
    """
    if not isinstance(peft_config, PeftConfig):
        raise ConfigError(f"peft_config must be a PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}.")
    get_method(peft_config.peft_type)
    peft_config = copy.deepcopy(peft_config)
    if peft_config.base_model_name_or_path is None:
        peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    peft_cls = TASK_CLASSES.get(peft_config.task_type, PeftModel)
    return peft_cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
