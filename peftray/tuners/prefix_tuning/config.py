"""`PrefixTuningConfig`: trainable key/value prefixes on every attention layer (P-Tuning v2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from peftray.errors import ConfigError
from peftray.tuners.config import PeftType, PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning.

    Args:
        encoder_hidden_size: hidden size of the `prefix_projection` MLP (defaults to token_dim).
        prefix_projection: reparameterise the prefix through an MLP while training; the saved prefix is its output.
        init_weights: None (random) or "zero".
    """

    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None

    _peft_type: ClassVar[PeftType] = PeftType.PREFIX_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"`init_weights` must be null or 'zero', got {self.init_weights!r}.")
