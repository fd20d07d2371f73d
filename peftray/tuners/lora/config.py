"""`LoraConfig`: LoRA, rsLoRA and DoRA, with the fields and JSON form of HF PEFT 0.21."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from peftray.errors import ConfigError
from peftray.tuners.config import PeftConfig, PeftType

_UNSUPPORTED = {
    "alora_invocation_tokens": None, "arrow_config": None, "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "kasa_config": None, "layer_replication": None, "loftq_config": {}, "lora_bias": False,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "monteclora_config": None,
    "qalora_group_size": 16, "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None,
    "use_qalora": False, "velora_config": None,
}


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation: W x + (alpha / r) * B A x on every targeted module.

    Args:
        r: rank of the update (> 0).
        target_modules: module names (a module matches if its path ends with `.name`), full paths, a regex string
            (full match on the path) or "all-linear" (every linear layer except the output head).
        exclude_modules: names or a regex of modules never to adapt.
        lora_alpha: scaling numerator; scaling = lora_alpha / r (or / sqrt(r) with `use_rslora`).
        lora_dropout: dropout on the LoRA input branch.
        fan_in_fan_out: True for layers storing weights as [in, out] (GPT-2's Conv1D).
        bias: "none", "all" (train every bias) or "lora_only" (biases of adapted layers).
        use_rslora: rank-stabilised scaling lora_alpha / sqrt(r).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        init_lora_weights: True (Kaiming-uniform A, zero B), "gaussian" (normal A with std 1/r, zero B) or
            False (both random, so the adapter changes the output from the start; for tests).
        layers_to_transform: layer indices (int or list) to adapt; others are left alone.
        layers_pattern: name of the layer list (e.g. "layers") used with layers_to_transform.
        rank_pattern: {module name or regex: rank} overriding `r` per module.
        alpha_pattern: {module name or regex: alpha} overriding `lora_alpha` per module.
        use_dora: weight-decomposed LoRA (DoRA): a learned magnitude per output row.
    """

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict[str, int]] = field(default_factory=dict)
    alpha_pattern: Optional[dict[str, int]] = field(default_factory=dict)
    use_dora: bool = False

    _unsupported_defaults: ClassVar[dict[str, Any]] = _UNSUPPORTED
    _inert_keys: ClassVar[frozenset[str]] = frozenset({"megatron_core", "qalora_group_size"})
    _peft_type: ClassVar[PeftType] = PeftType.LORA

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank("r", self.r)
        for name, rank in (self.rank_pattern or {}).items():
            _check_rank(f"rank_pattern[{name!r}]", rank)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"`bias` must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if not (self.init_lora_weights in (True, False) or str(self.init_lora_weights).lower() == "gaussian"):
            raise ConfigError(f"`init_lora_weights` must be True, False or 'gaussian', got {self.init_lora_weights!r} "
                              "(other PEFT initialisations are not supported by peftray).")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("`layers_pattern` needs `layers_to_transform`; set both or neither.")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})


def _check_rank(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"`{name}` must be a positive integer, got {value!r}. Set {name.split('[')[0]}=8 for example.")
