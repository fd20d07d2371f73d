"""`PromptTuningConfig`: soft prompt embeddings prepended to the input."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Optional

from peftray.errors import ConfigError
from peftray.tuners.config import PeftType, PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning.

    Args:
        prompt_tuning_init: "RANDOM", "TEXT" (embeddings of `prompt_tuning_init_text`) or "SAMPLE_VOCAB".
        prompt_tuning_init_text: the text whose token embeddings start the prompt (TEXT init).
        tokenizer_name_or_path: tokenizer used to tokenize that text (TEXT init).
        tokenizer_kwargs: extra keyword arguments for AutoTokenizer.from_pretrained (never trust_remote_code).
    """

    prompt_tuning_init: str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    _peft_type: ClassVar[PeftType] = PeftType.PROMPT_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.prompt_tuning_init = PromptTuningInit(str(getattr(self.prompt_tuning_init, "value",
                                                                   self.prompt_tuning_init)).upper())
        except ValueError:
            raise ConfigError(f"`prompt_tuning_init` must be RANDOM, TEXT or SAMPLE_VOCAB, "
                              f"got {self.prompt_tuning_init!r}.") from None
        if self.prompt_tuning_init == PromptTuningInit.TEXT and not (
                self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning_init='TEXT' needs `prompt_tuning_init_text` and `tokenizer_name_or_path`.")
