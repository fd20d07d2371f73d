"""`IA3Config`: (IA)^3 learned scaling vectors, with the fields and JSON form of HF PEFT 0.21."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from peftray.errors import ConfigError
from peftray.tuners.config import PeftConfig, PeftType


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3: multiply activations by learned vectors.

    Args:
        target_modules: modules whose output (or, for feedforward modules, input) is scaled; names, paths or a regex.
        exclude_modules: names or a regex of modules never to adapt.
        feedforward_modules: the subset of target_modules scaled on the input side (e.g. down_proj).
        fan_in_fan_out: True for layers storing weights as [in, out] (GPT-2's Conv1D).
        modules_to_save: modules trained in full and saved with the adapter.
        init_ia3_weights: True starts every vector at 1 (identity); False draws them at random (for tests).
    """

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True

    _peft_type: ClassVar[PeftType] = PeftType.IA3

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "feedforward_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (list, tuple, set)):
                setattr(self, name, set(getattr(self, name)))
        if (isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set)
                and not self.feedforward_modules <= self.target_modules):
            extra = sorted(self.feedforward_modules - self.target_modules)
            raise ConfigError(f"`feedforward_modules` must be a subset of `target_modules`; {extra} are not targeted.")
