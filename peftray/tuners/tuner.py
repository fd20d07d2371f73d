"""`BaseTuner`: wraps a transformers model and injects adapter layers into the modules a config targets.

Shared by LoRA and IA3: target matching (names, suffixes, regex, "all-linear", layers_to_transform), the
`modules_to_save` wrappers, adapter state (save/load with HF PEFT key names), set/delete/merge/unload.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from peftray.errors import AdapterFormatError, ConfigError
from peftray.tuners.layers import AdapterLayer, ModulesToSaveWrapper

MIN_TARGET_MODULES_FOR_SHORTENING = 20
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def target_matches(config: Any, key: str) -> bool | None:
    """True if module path `key` is targeted, False if not, None if excluded (exclude_modules/modules_to_save)."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if (re.fullmatch(exclude, key) if isinstance(exclude, str)
                else key in exclude or any(key.endswith(f".{e}") for e in exclude)):
            return None
    for m in getattr(config, "modules_to_save", None) or []:
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return None
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    idx = _layer_index(key, getattr(config, "layers_pattern", None))
    if idx is None:
        return False
    return idx == layers if isinstance(layers, int) else idx in layers


def minimal_suffixes(targets: set[str], others: set[str]) -> set[str]:
    """Shortest module-name suffixes that still pick exactly `targets` (PEFT does this for >= 20 targets)."""
    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {s for o in others for s in suffixes(o)}
    required: set[str] = set()
    for item, sufs in sorted(((t, suffixes(t)) for t in targets), key=lambda kv: kv[1]):
        for suf in sufs:
            if suf in required or suf in other_suffixes:
                continue
            if not any(item.endswith("." + r) for r in required):
                required.add(suf)
                break
    return required or set(targets)


def _module_name_hint(model: nn.Module) -> str:
    leaves = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                     if name and not list(mod.children()) and not name.rsplit(".", 1)[-1].isdigit()})
    return ", ".join(leaves[:40])


class BaseTuner(nn.Module):
    """Holds `self.model` (the transformers model) and its adapter configs; subclasses create the layers."""

    layer_cls: type[AdapterLayer] = AdapterLayer
    default_targets: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default", init_weights: bool = True):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, Any] = {}
        self.active_adapter = adapter_name
        for p in model.parameters():  # the base model is frozen; adapters (and chosen biases) train
            p.requires_grad_(False)
        self.inject_adapter(adapter_name, config, init_weights=init_weights)
        self.set_adapter(adapter_name, trainable=not config.inference_mode)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # --- injection --------------------------------------------------------------------------------
    def _prepare_config(self, config: Any) -> None:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if config.target_modules is None:
            if model_type not in self.default_targets:
                raise ConfigError(f"no default `target_modules` for model type {model_type!r}; set target_modules, "
                                  f"e.g. target_modules=['q_proj', 'v_proj'] (modules: {_module_name_hint(self.model)}).")
            config.target_modules = set(self.default_targets[model_type])

    def _expand_all_linear(self, config: Any) -> None:
        targets = config.target_modules
        if not (isinstance(targets, str) and targets.lower() == "all-linear"):
            return
        names = {n for n, m in self.model.named_modules()
                 if isinstance(m, nn.Linear) or type(m).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")}
        names |= {n for n, m in self.model.named_modules() if isinstance(m, AdapterLayer)}
        exclude = set()
        out_emb = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if out_emb is not None:
            exclude |= {n for n, m in self.model.named_modules() if m is out_emb}
        elif str(getattr(config, "task_type", "")) in ("TaskType.SEQ_CLS", "SEQ_CLS"):
            for head in SEQ_CLS_HEAD_NAMES:
                if getattr(self.model, head, None) is not None:
                    exclude.add(head)
                    break
        for prefix, m in self.model.named_modules():
            if isinstance(m, (AdapterLayer, ModulesToSaveWrapper)):
                exclude |= {f"{prefix}.{s}" for s, _ in m.named_modules() if s}
        config.target_modules = names - exclude

    def inject_adapter(self, adapter_name: str, config: Any, init_weights: bool = True) -> None:
        """Create adapter `adapter_name` in every targeted module (ConfigError if none matches)."""
        if adapter_name in self.peft_config:
            raise ConfigError(f"adapter {adapter_name!r} already exists; pick another adapter_name or delete it first.")
        self._prepare_config(config)
        self._expand_all_linear(config)
        named = list(self.model.named_modules())
        inside = tuple(f"{n}." for n, m in named if isinstance(m, (AdapterLayer, ModulesToSaveWrapper)))
        if isinstance(config.target_modules, (list, set, tuple)):
            config.target_modules = set(config.target_modules)
            if len(config.target_modules) >= MIN_TARGET_MODULES_FOR_SHORTENING and self.shorten_targets:
                sufs = tuple("." + t for t in config.target_modules)
                others = {n for n, _ in named if n not in config.target_modules and not n.endswith(sufs)}
                config.target_modules = minimal_suffixes(config.target_modules, others)
        matched = []
        for key, module in named:
            if not key or key.startswith(inside) or not target_matches(config, key):
                continue
            self._create_and_replace(config, adapter_name, module, key, init_weights)
            matched.append(key)
        if not matched:
            raise ConfigError(f"`target_modules` = {_show(config.target_modules)} matched no module of the base model. "
                              f"Module names that exist: {_module_name_hint(self.model)}.")
        self.peft_config[adapter_name] = config
        self.targeted_module_names = matched
        self._wrap_modules_to_save(config, adapter_name)

    shorten_targets = True

    def _create_and_replace(self, config, adapter_name, target, key, init_weights) -> None:  # pragma: no cover
        raise NotImplementedError

    def _replace(self, key: str, new: nn.Module) -> None:
        parent_name, _, child = key.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    def _wrap_modules_to_save(self, config: Any, adapter_name: str) -> None:
        names = getattr(config, "modules_to_save", None)
        if names:
            wrap_modules_to_save(self.model, names, adapter_name)

    # --- adapters ---------------------------------------------------------------------------------
    def adapter_modules(self):
        for name, module in self.model.named_modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield name, module

    def set_adapter(self, adapter_name: str | list[str], trainable: bool = True) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ConfigError(f"unknown adapter {name!r}; loaded adapters: {sorted(self.peft_config)}.")
        for _, module in self.adapter_modules():
            module.set_adapter(names, trainable)
        self.active_adapter = names[0] if len(names) == 1 else names
        self._apply_bias_trainability(names, trainable)

    def _apply_bias_trainability(self, names: list[str], trainable: bool) -> None:
        pass

    def delete_adapter(self, adapter_name: str) -> None:
        for _, module in self.adapter_modules():
            module.delete_adapter(adapter_name)
        self.peft_config.pop(adapter_name, None)

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        for _, module in self.adapter_modules():
            module.disabled = not enabled

    def disable_adapter_layers(self) -> None:
        self.enable_adapter_layers(False)

    # --- state ------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Adapter tensors keyed by module path inside the transformers model, without the adapter name."""
        out: dict[str, torch.Tensor] = {}
        for path, module in self.adapter_modules():
            if isinstance(module, AdapterLayer):
                for suffix, p in module.adapter_tensors(adapter_name).items():
                    out[f"{path}.{suffix}"] = p.detach()
            elif adapter_name in module.modules_to_save:
                for k, v in module.modules_to_save[adapter_name].state_dict().items():
                    out[f"{path}.{k}"] = v.detach()
        return out

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Copy `state` (keys as from `adapter_state_dict`) into adapter `adapter_name`; errors name the tensor."""
        state = dict(state)
        for path, module in self.adapter_modules():
            if isinstance(module, AdapterLayer):
                expected = module.adapter_tensors(adapter_name)
                if not expected:
                    continue
                found = {s: state.pop(f"{path}.{s}") for s in expected if f"{path}.{s}" in state}
                missing = [f"{prefix}{path}.{s}" for s in expected if s not in found]
                if missing:
                    raise AdapterFormatError(f"adapter file lacks tensors {missing[:4]} (and {max(0, len(missing) - 4)} "
                                             "more?): the file is incomplete or was made with another config.")
                module.load_adapter_tensors(adapter_name, found, f"{prefix}{path}.")
            elif adapter_name in module.modules_to_save:
                target = module.modules_to_save[adapter_name]
                sub = {k[len(path) + 1:]: state.pop(k) for k in list(state) if k.startswith(f"{path}.")}
                _load_module(target, sub, f"{prefix}{path}.")
        self._load_extra_state(state, prefix)
        if state:
            warnings.warn(f"adapter tensors not used by the model: {sorted(state)[:8]}", stacklevel=3)

    def _load_extra_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        pass

    # --- merge / unload ---------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        for _, module in self.adapter_modules():
            if isinstance(module, AdapterLayer):
                module.merge(adapter_names)

    def unmerge_adapter(self) -> None:
        for _, module in self.adapter_modules():
            if isinstance(module, AdapterLayer):
                module.unmerge()

    def _unload(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        for path, module in list(self.adapter_modules()):
            if isinstance(module, AdapterLayer):
                if merge:
                    module.merge(adapter_names)
                    module._saved_base = None  # the merge is final: drop the copy kept for unmerge
                else:
                    module.unmerge()
                self._replace(path, module.base_layer)
            else:
                self._replace(path, module.current() if merge else module.original_module)
        return self.model

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        return self._unload(True, adapter_names)

    def unload(self) -> nn.Module:
        return self._unload(False)


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> None:
    """Wrap every module whose path ends with one of `names` (PEFT's rule) in a ModulesToSaveWrapper."""
    named = list(model.named_modules())
    inside = tuple(f"{n}." for n, m in named if isinstance(m, (AdapterLayer, ModulesToSaveWrapper)))
    for key, module in named:
        if not key or key.startswith(inside) or not any(key.endswith(n) for n in names):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.add(adapter_name)
            continue
        parent_name, _, child = key.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))


def _load_module(module: nn.Module, sub: dict[str, torch.Tensor], prefix: str) -> None:
    # PEFT (bias="all") also writes `<head>.modules_to_save.<p>` and `<head>.original_module.<p>` duplicates:
    # the first is the head's own tensor, the second the frozen base copy (ignored).
    sub = {k.removeprefix("modules_to_save."): v for k, v in sub.items() if not k.startswith("original_module.")}
    own = module.state_dict()
    for k, t in sub.items():
        if k not in own:
            raise AdapterFormatError(f"unexpected tensor `{prefix}{k}` for module {type(module).__name__}")
        if tuple(own[k].shape) != tuple(t.shape):
            raise AdapterFormatError(f"tensor `{prefix}{k}` has shape {tuple(t.shape)} but the base model needs "
                                     f"{tuple(own[k].shape)}: the adapter was made for another base model.")
    module.load_state_dict(sub, strict=False)


def _show(targets: Any) -> str:
    return repr(sorted(targets)) if isinstance(targets, (set, list, tuple)) else repr(targets)
