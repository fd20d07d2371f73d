"""`PromptEncoderConfig`: P-tuning, virtual tokens produced by an MLP or LSTM prompt encoder."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Optional

from peftray.errors import ConfigError
from peftray.tuners.config import PeftType, PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning.

    Args:
        encoder_reparameterization_type: "MLP" (3 linear layers) or "LSTM" (bidirectional LSTM + MLP head).
        encoder_hidden_size: hidden size of the encoder (defaults to token_dim).
        encoder_num_layers: LSTM layers (the MLP always has 3 linear layers, as in PEFT).
        encoder_dropout: LSTM dropout.
    """

    encoder_reparameterization_type: str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    _peft_type: ClassVar[PeftType] = PeftType.P_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        value = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(str(value).upper())
        except ValueError:
            raise ConfigError(f"`encoder_reparameterization_type` must be MLP or LSTM, got {value!r}.") from None
