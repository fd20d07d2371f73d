"""The one place PEFT methods are registered: `peft_type` name -> (config class, model class).

A method's package calls `register_peft_method(...)` when imported; `peftray.tuners` imports every method
package, so adding a method is one new folder plus one import line there.
"""

from __future__ import annotations

from typing import Any

from peftray.errors import ConfigError

_METHODS: dict[str, tuple[type, type]] = {}


def register_peft_method(name: str, config_cls: type, model_cls: type) -> None:
    """Register a PEFT method under its `peft_type` name (e.g. "LORA"); names are case-insensitive."""
    key = name.upper()
    if key in _METHODS and _METHODS[key] != (config_cls, model_cls):
        raise ValueError(f"PEFT method {name!r} is already registered")
    _METHODS[key] = (config_cls, model_cls)


def registered_methods() -> list[str]:
    """Names of the registered methods, e.g. ["IA3", "LORA", ...]."""
    return sorted(_METHODS)


def get_method(name: Any) -> tuple[type, type]:
    """(config class, model class) of a method; ConfigError naming the known ones if it is unknown."""
    key = str(getattr(name, "value", name)).upper()
    if key not in _METHODS:
        raise ConfigError(f"unknown PEFT method `peft_type` = {name!r}; known methods: {', '.join(registered_methods())}.")
    return _METHODS[key]


def config_from_dict(data: dict[str, Any]):
    """Build the right config class from an adapter_config.json dict (only `peft_type` is required)."""
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ConfigError("adapter_config.json has no `peft_type`; it is not a PEFT adapter config.")
    config_cls, _ = get_method(data["peft_type"])
    return config_cls.from_dict(data)
