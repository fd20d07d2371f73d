"""Which adapter version a request's `model` means, kept fresh by polling the registry's aliases.

`name@alias` is re-read (one cheap `alias_state` call) at most every `poll_s` seconds, so a promotion or
rollback reaches new requests within `poll_s` (plus one registry round trip) without a restart. The
resolved version is immutable (`name/3`): the engine routes and pins by it, so a request that already
started keeps its version to the end.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from peftray.errors import ConfigError, NotFoundError
from peftray.registry.finetuned import FT_TAG, is_fine_tuned, parse_fine_tuned
from peftray.serve.serve_spec import ServeConfig
from peftray.tuners.methods import Method, method_entry, method_for_spec


@dataclass(frozen=True)
class Target:
    """What to run: the base model (key None) or one immutable adapter version `key` = `name/3`."""

    model: str  # as the request named it
    key: Optional[str] = None
    method: Optional[str] = None


def _same_base(a: Optional[str], b: str) -> bool:
    if not a:
        return True  # unknown base: the engine's shape checks still refuse a wrong one
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or os.path.basename(a) == os.path.basename(b)


def _table_entry(av) -> Optional[Method]:
    """The tuners' table entry of an adapter version: by its `peft_type` tag, else (versions registered before
    that tag) by its method tag; None when neither names a method here (its load then says why it is refused)."""
    try:
        peft_type, method = getattr(av, "peft_type", None), getattr(av, "method", None)
        if peft_type:
            return method_entry(peft_type)
        return method_for_spec(method) if method else None
    except ConfigError:
        return None


def field_error(param: str, message: str) -> ConfigError:
    """A 400 about one request field: the API reports `param` in OpenAI's error object."""
    err = ConfigError(message)
    err.param = param
    return err


_TASK_TYPES = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls"}  # PEFT task_type -> the serve spec's task


def adapter_task(av) -> Optional[str]:
    """The serve task an adapter version is for: `text_to_image` for a UNet adapter (it carries diffusers'
    weights file), `causal_lm` / `seq_cls` by its PEFT task type (another task type by its own name, which no
    deployment serves), `image_cls` for one without a task type whose config saves a `classifier` (as image_cls
    training writes it); None when the version does not say (the engine then checks the tensors against its
    model)."""
    import json

    from peftray.adapters.diffusers_lora import DIFFUSERS_WEIGHTS_NAME
    from peftray.registry.types import TAG_ADAPTER_CONFIG, TAG_TASK_TYPE

    if DIFFUSERS_WEIGHTS_NAME in (av.files or {}):
        return "text_to_image"
    tags = av.tags or {}
    task_type = tags.get(TAG_TASK_TYPE)
    if task_type:
        return _TASK_TYPES.get(task_type, task_type.lower())
    try:
        config = json.loads(tags.get(TAG_ADAPTER_CONFIG) or "{}")
    except ValueError:
        return None
    saved = config.get("modules_to_save") if isinstance(config, dict) else None
    return "image_cls" if "classifier" in (saved or []) else None


class ModelResolver:
    """Maps request `model` strings to Targets, checking what this deployment may serve.

    Args:
        spec: the serve spec (base model, allowed adapters, poll interval).
        registry: object with `resolve`, `alias_state` (default: `peftray.registry`); tests of pure logic
            pass their own.
        clock: monotonic clock.
    """

    def __init__(self, spec: ServeConfig, registry=None, clock: Callable[[], float] = time.monotonic) -> None:
        if registry is None:
            import peftray.registry as registry
        self.spec, self.registry, self.clock = spec, registry, clock
        self._versions: dict[str, object] = {}  # "name/3" -> AdapterVersion (immutable: cached forever)
        self._aliases: dict[tuple[str, str], tuple[int, str, float]] = {}  # -> (version, token, checked at)
        self._lock = threading.Lock()

    def is_base(self, model: str) -> bool:
        names = {self.spec.served_model_id, self.spec.base_model, os.path.basename(self.spec.base_model.rstrip("/"))}
        return model in names

    def allowed(self, name: str, ref: str) -> bool:
        for entry in self.spec.adapters:
            if entry == "*" or entry == name or entry == ref:
                return True
        return False

    def resolve(self, model: str) -> Target:
        """The Target for `model`.

        Raises:
            NotFoundError: not a reference, not served here, or unknown to the registry (404).
            ConfigError: the adapter was trained on another base model, or cannot be served (400).
        """
        from peftray.registry.resolve import parse_ref

        if not isinstance(model, str) or not model:
            raise ConfigError("`model` must name the base model or an adapter (name@alias, name/3).")
        if self.is_base(model):
            return Target(model)
        if is_fine_tuned(model):
            return self._fine_tuned(model)
        try:
            ref = parse_ref(model)
        except NotFoundError:
            raise NotFoundError(f"The model `{model}` does not exist: use {self.spec.served_model_id!r} or an "
                                "adapter as name@alias or name/<version>.") from None
        if not self.allowed(ref.name, str(ref)):
            raise NotFoundError(f"The model `{model}` does not exist on this deployment (it serves: "
                                f"{', '.join(self.spec.adapters)}).")
        version = ref.version if ref.version is not None else self._alias_version(ref.name, ref.alias)
        return self._target(model, self._version(ref.name, version))

    def _fine_tuned(self, model: str) -> Target:
        """`ft:<base>:<owner>:<suffix>:<job id>[:ckpt-step-<n>]`: the adapter version tagged with that name."""
        ref = parse_fine_tuned(model)
        if not self.allowed(ref.adapter, model):
            raise NotFoundError(f"The model `{model}` does not exist on this deployment (it serves: "
                                f"{', '.join(self.spec.adapters)}).")
        with self._lock:
            av = self._versions.get(model)
        if av is None:  # a fine-tuned name stands for one version for good: cached like `name/3`
            av = self.registry.resolve_fine_tuned(model)
            with self._lock:
                self._versions[model] = av
        return self._target(model, av)

    def _target(self, model: str, av) -> Target:
        kind = adapter_task(av)
        if kind is not None and kind != self.spec.task:
            raise field_error("model", f"`model` {model!r} is a {kind} adapter ({av.name}/{av.version}) but this "
                                       f"deployment serves {self.spec.task} ({self.spec.served_model_id!r}); send "
                                       f"it to a {kind} deployment of its base model.")
        if not _same_base(av.base_model, self.spec.base_model):
            raise ConfigError(f"adapter {av.name}/{av.version} was trained for base model {av.base_model!r}, but "
                              f"this deployment serves {self.spec.served_model_id!r}; send it to a deployment of "
                              "its own base model.")
        method = _table_entry(av)
        if method is not None and method.serving is None:  # the tuners' table: IA3, LN tuning, ...
            raise ConfigError(f"adapter {av.name}/{av.version} is {method.peft_type}, which this server does not "
                              "batch; merge it into the base model and serve that model.")
        return Target(model, key=f"{av.name}/{av.version}", method=av.method)

    def _alias_version(self, name: str, alias: str) -> int:
        now = self.clock()
        with self._lock:
            seen = self._aliases.get((name, alias))
        if seen is not None and now - seen[2] < self.spec.alias_poll_s:
            return seen[0]
        if alias == "latest":
            version, token = self.registry.resolve(f"{name}@latest").version, ""
        else:
            version, token = self.registry.alias_state(name, alias)
        if version is None:
            raise NotFoundError(f"The model `{name}@{alias}` does not exist: adapter {name!r} has no alias "
                                f"{alias!r}. Promote a version first (peftray registry promote {name} <v> {alias}).")
        with self._lock:
            self._aliases[(name, alias)] = (int(version), token, now)
        return int(version)

    def _version(self, name: str, version: int):
        key = f"{name}/{version}"
        with self._lock:
            av = self._versions.get(key)
        if av is None:
            av = self.registry.resolve(key)
            with self._lock:
                self._versions[key] = av
        return av

    def listed(self) -> list[dict]:
        """Entries for GET /v1/models: the base model, then every reference this deployment answers now.

        A bare `name` (or `*`) entry lists each alias of the adapter and `name@latest`; `name@alias` and
        `name/3` entries list themselves. Each adapter entry names the registry version it resolves to now
        (`version`) and its base model as `parent`; adapters of another base model are left out.
        """
        base = self.spec.served_model_id
        out = [{"id": base, "object": "model", "created": 0, "owned_by": "peftray", "root": self.spec.base_model,
                "parent": None}]
        seen = set()
        summaries = None
        for entry in self.spec.adapters:
            if "@" not in entry and "/" not in entry and summaries is None:
                summaries = {a.name: a for a in self.registry.list_adapters()}
            for ref, name, version in self._expand(entry, summaries):
                if ref in seen:
                    continue
                seen.add(ref)
                try:
                    av = self._version(name, version)
                except NotFoundError:
                    continue
                if not _same_base(av.base_model, self.spec.base_model):
                    continue
                # a fine-tuning job's adapter is listed under its `ft:` name too
                for listed_as in (ref, av.tags.get(FT_TAG)):
                    if listed_as and (listed_as == ref or listed_as not in seen):
                        seen.add(listed_as)
                        out.append({"id": listed_as, "object": "model", "owned_by": "peftray",
                                    "created": int((av.created_at_ms or 0) // 1000), "root": f"{name}/{version}",
                                    "parent": base, "version": int(version), "method": av.method})
        return out

    def _expand(self, entry: str, summaries: Optional[dict]) -> list[tuple[str, str, int]]:
        """(reference, adapter name, version it resolves to now) for one `adapters` entry of the spec."""
        from peftray.registry.resolve import parse_ref

        if "@" in entry or "/" in entry:
            ref = parse_ref(entry)
            try:
                version = ref.version if ref.version is not None else self._alias_version(ref.name, ref.alias)
            except NotFoundError:
                return []
            return [(entry, ref.name, version)]
        names = sorted(summaries) if entry == "*" else [entry]
        refs = []
        for name in names:
            summary = summaries.get(name)
            if summary is None or summary.latest_version is None:
                continue
            for alias, version in sorted((summary.aliases or {}).items()):
                refs.append((f"{name}@{alias}", name, int(version)))
            refs.append((f"{name}@latest", name, int(summary.latest_version)))
        return refs
