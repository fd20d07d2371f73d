"""Adapter slots: a fixed number of adapters held by one replica, least recently used evicted first.

A slot is pinned while a request runs on it, so eviction never pulls an adapter out from under a running
row (a running request finishes on the version it started with, even after a promotion moved the alias).
LoRA adapters live inside the engine's PeftModel (one mixed-adapter forward serves them all); prompt
methods are plain tensors the engine puts in front of the row: virtual token embeddings (prompt tuning,
P-tuning) or a prefilled key/value prefix (prefix tuning).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch

from peftray.adapters import io as adapter_io
from peftray.errors import AdapterFormatError, PeftrayError
from peftray.tuners.config import PeftType, TaskType, fill_from_model_config
from peftray.tuners.methods import method_entry
from peftray.tuners.prompt_learning import prefix_key_values


class OverloadedError(PeftrayError):
    """The replica cannot take the request now (queue full, every slot pinned); retry after a moment."""

    code = "overloaded"
    http_status = 503
    retry_after_s = 1


@dataclass(eq=False)
class LoadedAdapter:
    """One adapter in a slot.

    Attributes:
        key: what it was loaded as: `name/3` for registry versions, else the folder.
        kind: `lora` (in the mixed-adapter forward), `prompt` (virtual tokens) or `prefix` (KV prefix).
        internal: the adapter's name inside the engine's PeftModel (LoRA only).
        prompt: [virtual tokens, hidden] embeddings for `prompt`.
        prefix: per layer (keys, values) [1, kv_heads, virtual tokens, head_dim] for `prefix`.
        pins: requests running on it now.
    """

    key: str
    kind: str
    internal: str
    prompt: Optional[torch.Tensor] = None
    prefix: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
    pins: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def virtual_tokens(self) -> int:
        if self.prompt is not None:
            return int(self.prompt.shape[0])
        if self.prefix is not None:
            return int(self.prefix[0][0].shape[2])
        return 0


class AdapterHost(Protocol):
    """What slots need from the engine: check an adapter fits, put LoRA weights into its model and take them out."""

    def check_adapter(self, key: str, config, state: dict) -> None: ...

    def add_lora(self, internal: str, config, state: dict) -> None: ...

    def remove_lora(self, internal: str) -> None: ...

    def prompt_tensors(self, config, state: dict) -> tuple[str, object]: ...


def internal_name(key: str) -> str:
    """A module-safe adapter name for `key` (PeftModel names become ModuleDict keys: no dots)."""
    return "a_" + re.sub(r"[^A-Za-z0-9_]", "_", key)[-80:] + f"_{abs(hash(key)) % 10**8}"


class AdapterSlots:
    """`capacity` adapters at most; `acquire` loads (evicting the LRU unpinned one) and pins, `release` unpins.

    Two locks, always taken in this order: `_lock` guards the table and is held across a load, which waits for
    the engine's model lock; `_pins` guards pin counts only and is a leaf. The engine thread releases a finished
    row's slot while it holds the model lock, so `release` must never wait for `_lock` (that was a deadlock).
    """

    def __init__(self, host: AdapterHost, capacity: int) -> None:
        self.host, self.capacity = host, capacity
        self._slots: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self._pins = threading.Lock()
        self.loads = self.evictions = 0
        self.load_seconds = 0.0  # time spent reading adapters into slots (a metric)

    def keys(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        with self._lock:
            return list(self._slots)

    def acquire(self, key: str, folder: str | Path) -> LoadedAdapter:
        """The adapter `key` pinned for one request, read from `folder` if it is not loaded yet.

        Raises:
            OverloadedError: every slot holds an adapter that running requests use.
            AdapterFormatError: not an adapter this engine can serve (IA3, another task, bad tensors).
        """
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                self._slots.move_to_end(key)
                with self._pins:
                    slot.pins += 1
                return slot
            if len(self._slots) >= self.capacity:
                self._evict_one()
            start = time.perf_counter()
            slot = self._load(key, folder)
            self.load_seconds += time.perf_counter() - start
            slot.pins = 1
            self._slots[key] = slot
            self.loads += 1
            return slot

    async def acquire_async(self, key: str, folder: str | Path) -> LoadedAdapter:
        """`acquire` in a worker thread. If the caller is cancelled meanwhile (client gone, request timeout), the
        load still finishes in its thread; its pin is then released, so the slot does not stay pinned for good."""
        fut = asyncio.ensure_future(asyncio.to_thread(self.acquire, key, folder))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            def unpin(f: asyncio.Future) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.release(f.result())

            fut.add_done_callback(unpin)
            raise

    def release(self, slot: LoadedAdapter) -> None:
        with self._pins:
            slot.pins = max(0, slot.pins - 1)

    def _evict_one(self) -> None:
        with self._pins:  # pins only fall without `_lock`: an unpinned victim stays unpinned
            victim = next((k for k, s in self._slots.items() if s.pins == 0), None)
        if victim is None:
            raise OverloadedError(f"all {self.capacity} adapter slots of this replica hold adapters that running "
                                  "requests use; retry shortly or raise max_adapters_per_replica in serve.yaml.")
        slot = self._slots.pop(victim)
        if slot.kind == "lora":
            self.host.remove_lora(slot.internal)
        self.evictions += 1

    def _load(self, key: str, folder: str | Path) -> LoadedAdapter:
        check_folder = getattr(self.host, "check_folder", None)  # optional: parts beside the adapter's own files
        if check_folder is not None:
            check_folder(key, Path(folder))
        config, state = adapter_io.read_adapter(str(folder))
        self.host.check_adapter(key, config, state)
        internal = internal_name(key)
        serving = method_entry(config.peft_type).serving  # the tuners' table says how (and if) it is batched
        if serving == "lora":
            self.host.add_lora(internal, config, state)
            return LoadedAdapter(key, "lora", internal)
        if serving == "prompt":
            kind, tensors = self.host.prompt_tensors(config, state)
            if kind == "prompt":
                return LoadedAdapter(key, kind, internal, prompt=tensors)
            return LoadedAdapter(key, kind, internal, prefix=tensors)
        raise AdapterFormatError(f"adapter {key!r} is {config.peft_type.value}, which the serving engine does not "
                                 "batch; merge it into the base model (merge_and_unload) and serve that, or use LoRA.")


def check_text_adapter(key: str, config, state: dict, model) -> None:
    """AdapterFormatError unless `config` is a text-generation adapter whose tensors name modules of `model`."""
    if config.task_type not in (None, TaskType.CAUSAL_LM):
        raise AdapterFormatError(f"adapter {key!r} (the request's `model`) has task_type "
                                 f"{config.task_type.value}; only CAUSAL_LM adapters generate text.")
    check_modules(key, config, state, model, "text model")


def check_modules(key: str, config, state: dict, model, what: str) -> None:
    """AdapterFormatError when a LoRA adapter's tensors name modules `model` does not have: it was trained on
    another kind of model (a UNet adapter sent to a causal LM, or the other way round)."""
    if config.peft_type != PeftType.LORA:
        return
    names = {n for n, _ in model.named_modules()}
    paths = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in state if ".lora_" in k}
    missing = sorted(p for p in paths if p not in names)
    if missing:
        raise AdapterFormatError(f"adapter {key!r} (the request's `model`) adapts modules that this deployment's "
                                 f"{what} does not have ({', '.join(missing[:3])}): it was trained for another kind "
                                 "of model. Send it to a deployment of its own base model.")


class LoraHost:
    """LoRA slots inside one PeftModel around `self.base` (`self.peft`, made on the first LoRA): the part of an
    engine that `AdapterSlots` calls. The engine sets `base`, `peft = None`, `_dormant = None`, `_model_lock`."""

    def add_lora(self, internal: str, config, state: dict) -> None:
        from peftray.task_models import PeftModel

        with self._model_lock:
            if self.peft is None:
                # Serving keeps adapters in the base dtype (float32 copies only help training updates)
                self.peft = PeftModel.from_pretrained(self.base, (config, state), adapter_name=internal,
                                                      on_base_mismatch="ignore", autocast_adapter_dtype=False).eval()
            else:
                self.peft.load_adapter((config, state), adapter_name=internal, on_base_mismatch="ignore",
                                       autocast_adapter_dtype=False)
            if self._dormant is not None and self._dormant != internal:
                self.peft.delete_adapter(self._dormant)
                self._dormant = None
            self._weights_scope = object()  # see GenerationEngine._forward

    def remove_lora(self, internal: str) -> None:
        with self._model_lock:
            self._weights_scope = object()
            if self.peft is not None and len(self.peft.peft_config) == 1:
                self._dormant = internal  # deleting the last adapter would leave the PeftModel without one
                return
            if self.peft is not None:
                self.peft.delete_adapter(internal)


def prompt_tensors(config, state: dict, model_config, dtype: torch.dtype, device) -> tuple[str, object]:
    """(kind, tensors) for a prompt-method adapter, checked against the base model's sizes."""
    if "prompt_embeddings" not in state:
        raise AdapterFormatError("adapter file lacks the tensor `prompt_embeddings`.")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    fill_from_model_config(config, model_config)
    emb = state["prompt_embeddings"].to(device=device, dtype=dtype)
    n = config.num_virtual_tokens
    if config.peft_type != PeftType.PREFIX_TUNING:
        hidden = model_config.hidden_size
        if emb.dim() != 2 or emb.shape[1] != hidden:
            raise AdapterFormatError(f"`prompt_embeddings` has shape {tuple(emb.shape)} but the base model's hidden "
                                     f"size is {hidden}: the adapter was made for another base model.")
        return "prompt", emb
    want = config.num_layers * 2 * config.token_dim
    if emb.dim() != 2 or emb.shape != (n, want):
        raise AdapterFormatError(f"`prompt_embeddings` has shape {tuple(emb.shape)} but this base model needs "
                                 f"{(n, want)}: the adapter was made for another base model.")
    return "prefix", prefix_key_values(emb.unsqueeze(0), config)
