"""`LNTuningConfig`: LayerNorm tuning, with the fields and JSON form of HF PEFT 0.21."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from peftray.tuners.config import PeftConfig, PeftType


@dataclass
class LNTuningConfig(PeftConfig):
    """LayerNorm tuning: train a copy of each targeted normalization layer (LayerNorm, Llama's RMSNorm).

    Args:
        target_modules: the norm layers to copy and train; names, paths or a regex (None = the model type's
            default, e.g. Llama's input_layernorm, post_attention_layernorm and norm).
        exclude_modules: names or a regex of modules never to adapt.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    _peft_type: ClassVar[PeftType] = PeftType.LN_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (list, tuple, set)):
                setattr(self, name, set(getattr(self, name)))
