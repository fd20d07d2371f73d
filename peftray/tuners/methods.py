"""THE table of PEFT methods: `peft_type` name -> config class, model class and job-spec sections.

A method's package registers itself when imported (`register_peft_method(...)` in its `__init__`), and
`peftray.tuners` imports every method package, so adding a method is one new folder plus one import line
there. Everything else derives from this table: the job spec's `adapter:` union (`spec_models()`), the
trainer's config class (`method_for_spec()`), the registry's accepted `peft_type`s (`registered_methods()`),
what the serving engine batches (`Method.serving`), and the public names of the config and tuner classes
(`peftray.LoraConfig`, `peftray.tuners.IA3Model`: `class_attributes()`).

The table is torch-free: a model class is named as `"module:Class"` and imported on first use, so the
job spec, the control plane and the registry read the table without loading torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from peftray.errors import ConfigError


@dataclass(frozen=True)
class Method:
    """One registered PEFT method.

    Attributes:
        peft_type: the `peft_type` of adapter_config.json, e.g. "LORA".
        config_cls: the config dataclass (HF PEFT's fields and JSON form).
        model_ref: the tuner class, or `"module:Class"` naming it (imported on first use).
        specs: the job spec's `adapter:` sections for this method (pydantic models, each with a
            `method: Literal[...]` field and `peft_kwargs()`), e.g. LoRA's `lora` and `dora`.
        serving: how the serving engine batches the method's adapters: "lora" (inside its mixed-adapter
            forward) or "prompt" (virtual tokens or a KV prefix in front of the row); None = it does not, and
            serving refuses such adapters (merge them into the base model and serve that instead).
    """

    peft_type: str
    config_cls: type
    model_ref: Any
    specs: tuple[type, ...] = ()
    serving: str | None = None

    @property
    def model_cls(self) -> type:
        if isinstance(self.model_ref, str):
            module, _, name = self.model_ref.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.model_ref

    @property
    def model_name(self) -> str:
        """The tuner class's name, without importing it."""
        if isinstance(self.model_ref, str):
            return self.model_ref.partition(":")[2]
        return self.model_ref.__name__

    @property
    def adapts_weights(self) -> bool:
        """True for methods that change layers (LoRA, IA3): the ones quantized bases can take."""
        from peftray.tuners.config import PromptLearningConfig

        return not issubclass(self.config_cls, PromptLearningConfig)


_METHODS: dict[str, Method] = {}


SERVING_KINDS = ("lora", "prompt")


def register_peft_method(name: str, config_cls: type, model_cls: Any, specs: tuple[type, ...] = (),
                         serving: str | None = None) -> None:
    """Register a PEFT method under its `peft_type` name (e.g. "LORA"); names are case-insensitive.

    Args:
        name: the `peft_type`.
        config_cls: its config class.
        model_cls: its tuner class, or `"module:Class"` so that registering does not import torch.
        specs: its job-spec sections (see `Method.specs`); none = not trainable from a job spec.
        serving: how the serving engine batches it (see `Method.serving`); None = not served.
    """
    key = name.upper()
    if serving not in (None, *SERVING_KINDS):
        raise ValueError(f"`serving` of {key} must be one of {SERVING_KINDS} or None, got {serving!r}")
    method = Method(key, config_cls, model_cls, tuple(specs), serving)
    if key in _METHODS and _METHODS[key] != method:
        raise ValueError(f"PEFT method {name!r} is already registered")
    taken = {s: m.peft_type for m in _METHODS.values() if m.peft_type != key for s in _spec_names(m)}
    clash = [s for s in _spec_names(method) if s in taken]
    if clash:
        raise ValueError(f"job-spec method name(s) {clash} of {key} are already used by {taken[clash[0]]}")
    _METHODS[key] = method


def _spec_names(method: Method) -> list[str]:
    return [spec.model_fields["method"].default for spec in method.specs]


def registered_methods() -> list[str]:
    """Names of the registered methods, e.g. ["IA3", "LORA", ...]."""
    return sorted(_METHODS)


def get_method(name: Any) -> tuple[type, type]:
    """(config class, model class) of a method; ConfigError naming the known ones if it is unknown."""
    method = method_entry(name)
    return method.config_cls, method.model_cls


def method_entry(name: Any) -> Method:
    """The table's entry for a `peft_type`; ConfigError naming the known ones if it is unknown."""
    key = str(getattr(name, "value", name)).upper()
    if key not in _METHODS:
        raise ConfigError(f"unknown PEFT method `peft_type` = {name!r}; known methods: {', '.join(registered_methods())}.")
    return _METHODS[key]


def spec_models() -> dict[str, type]:
    """The job spec's method name (`lora`, `dora`, `ia3`, ...) -> its pydantic section, in registration order."""
    return {name: spec for m in _METHODS.values() for spec, name in zip(m.specs, _spec_names(m))}


def method_for_spec(spec_method: str) -> Method:
    """The table entry behind a job spec's `adapter.method` (e.g. `dora` -> LORA)."""
    for method in _METHODS.values():
        if spec_method in _spec_names(method):
            return method
    raise ConfigError(f"unknown `adapter.method` {spec_method!r}; known: {', '.join(spec_models())}.")


def config_from_dict(data: dict[str, Any]):
    """Build the right config class from an adapter_config.json dict (only `peft_type` is required)."""
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ConfigError("adapter_config.json has no `peft_type`; it is not a PEFT adapter config.")
    return method_entry(data["peft_type"]).config_cls.from_dict(data)


def method_class(name: str, kinds: tuple[str, ...] = ("config", "model")) -> type | None:
    """A registered method's config class ("config") or tuner class ("model") by class name, else None."""
    for method in _METHODS.values():
        if "config" in kinds and method.config_cls.__name__ == name:
            return method.config_cls
        if "model" in kinds and method.model_name == name:
            return method.model_cls
    return None


def class_attributes(package: str, kinds: tuple[str, ...] = ("config", "model"), table_module: str = ""):
    """A module `__getattr__` (PEP 562) giving the registered methods' classes by name (`LNTuningConfig`), so a
    package re-exports every method's classes without listing them.

    Args:
        package: the module's name, for the AttributeError.
        kinds: "config" and/or "model" classes.
        table_module: a module to import first so that every method is registered (`peftray.tuners`).
    """

    def __getattr__(name: str) -> Any:
        if table_module:
            importlib.import_module(table_module)
        cls = method_class(name, kinds)
        if cls is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return cls

    return __getattr__


def lazy_attributes(package: str, **modules: str):
    """A module `__getattr__` importing each named class from its module on first use (PEP 562).

    Method packages export their tuner class this way, so importing a package (to register it) needs no torch.
    """

    def __getattr__(name: str) -> Any:
        if name in modules:
            return getattr(importlib.import_module(modules[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
