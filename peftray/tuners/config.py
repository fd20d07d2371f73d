"""Configuration shared by every PEFT method: the method/task enums and the `PeftConfig` base dataclass.

A config round-trips through `adapter_config.json` exactly as Hugging Face PEFT 0.21 writes it: `to_dict()` emits
the same keys (including the keys of PEFT features peftray does not implement, at their neutral values) and
`from_dict()` accepts those keys only at those values, so an adapter that needs an unsupported feature is refused
instead of being silently loaded wrong.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from peftray.errors import ConfigError

# What peftray writes as `peft_version`: the PEFT format version it reads and writes.
PEFT_FORMAT_VERSION = "0.21.2"


class PeftType(str, enum.Enum):
    """The `peft_type` field of adapter_config.json."""

    LORA = "LORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    LN_TUNING = "LN_TUNING"


class TaskType(str, enum.Enum):
    """The `task_type` field: which transformers head the adapter was trained with."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
    QUESTION_ANS = "QUESTION_ANS"


def _enum_value(value: Any, enum_cls: type[enum.Enum], field_name: str) -> Any:
    if value is None or isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).upper() if enum_cls is not PeftType else str(value))
    except ValueError:
        known = ", ".join(e.value for e in enum_cls)
        raise ConfigError(f"`{field_name}` must be one of {known}, got {value!r}.") from None


@dataclass
class PeftConfig:
    """Fields every adapter config has.

    Args:
        task_type: the model head (`TaskType` or its name), e.g. "CAUSAL_LM".
        base_model_name_or_path: the base model the adapter was made for (filled in when wrapping a model).
        revision: the base model's revision, if any.
        inference_mode: True once loaded for inference (adapter weights frozen).
    """

    task_type: Optional[str] = None
    peft_type: Optional[str] = None
    auto_mapping: Optional[dict] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    # Keys PEFT writes for features peftray does not implement, with the only value peftray accepts.
    _unsupported_defaults: ClassVar[dict[str, Any]] = {}
    # Keys PEFT writes whose value does not change what the adapter computes (accepted with any value).
    _inert_keys: ClassVar[frozenset[str]] = frozenset()
    _peft_type: ClassVar[Optional[PeftType]] = None

    def __post_init__(self) -> None:
        self.task_type = _enum_value(self.task_type, TaskType, "task_type")
        if self._peft_type is not None:
            self.peft_type = self._peft_type

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT writes to adapter_config.json (sets as lists, enums as names)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        for key, default in self._unsupported_defaults.items():
            out.setdefault(key, _jsonable(default))
        out["peft_version"] = PEFT_FORMAT_VERSION
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build a config from an adapter_config.json dict; unknown keys are dropped with a warning."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, dropped = {}, []
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in cls._unsupported_defaults:
                if key not in cls._inert_keys and not _is_neutral(value, cls._unsupported_defaults[key]):
                    raise ConfigError(
                        f"adapter_config.json sets `{key}` = {value!r}, a PEFT feature peftray does not support; "
                        f"it must be {cls._unsupported_defaults[key]!r}. Retrain the adapter without it.")
            elif key != "peft_version":
                dropped.append(key)
        if dropped:
            warnings.warn(f"ignoring unknown adapter config keys {sorted(dropped)} for {cls.__name__}", stacklevel=2)
        return cls(**kwargs)


def _is_neutral(value: Any, default: Any) -> bool:
    return value == default or (value in (None, {}, [], False) and default in (None, {}, [], False))


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by prompt tuning, prefix tuning and P-tuning.

    Args:
        num_virtual_tokens: how many virtual tokens the adapter prepends.
        token_dim: hidden size of the base model (filled in from the model config when None).
        num_transformer_submodules: 1, or 2 for encoder-decoder models (filled in when None).
        num_attention_heads: attention heads of the base model (key/value heads for prefix tuning with GQA).
        num_layers: transformer layers of the base model (filled in when None).
        modules_to_save: extra modules trained in full and saved (e.g. a classifier head).
    """

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None or int(self.num_virtual_tokens) <= 0:
            raise ConfigError(f"`num_virtual_tokens` must be a positive integer, got {self.num_virtual_tokens!r}. "
                              "Set num_virtual_tokens, e.g. num_virtual_tokens=20.")

    @property
    def is_prompt_learning(self) -> bool:
        return True


def fill_from_model_config(config: PromptLearningConfig, model_config: Any) -> None:
    """Fill num_layers / token_dim / num_attention_heads from a transformers config, as PEFT does.

    Prefix tuning with grouped-query attention stores key/value heads: `num_attention_heads` becomes
    `num_key_value_heads` and `token_dim` becomes `head_dim * num_key_value_heads`.
    """
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)

    def pick(*keys: str) -> Optional[int]:
        for key in keys:
            value = getattr(cfg, key, None) if hasattr(cfg, key) else data.get(key)
            if value is not None:
                return value
        return None

    for name, keys in (("num_layers", ("num_hidden_layers", "num_layers", "n_layer")),
                       ("token_dim", ("hidden_size", "n_embd", "d_model")),
                       ("num_attention_heads", ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))):
        if getattr(config, name) is None:
            value = pick(*keys)
            if value is None:
                raise ConfigError(f"cannot infer `{name}` from the base model config; set {name} in the adapter config.")
            setattr(config, name, value)
    if config.peft_type == PeftType.PREFIX_TUNING and data.get("num_key_value_heads") is not None:
        head_dim = data.get("head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * data["num_key_value_heads"]
        config.num_attention_heads = data["num_key_value_heads"]
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
