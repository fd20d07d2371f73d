"""Reading and writing adapter folders in the HF PEFT format: adapter_config.json + adapter_model.safetensors.

Paths may be local folders or `s3://bucket/prefix` URIs (s3fs, imported only when such a path is used, with the
endpoint and credentials of `peftray.endpoints.load_config()`). Pickle files (`adapter_model.bin`) are refused and
never opened. The format's names and checks live in `peftray.adapters.format`.
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from peftray.adapters.format import (
    CONFIG_NAME, SAFETENSORS_HINT, WEIGHTS_NAME, check_safetensors, is_pickle, parse_config,
)
from peftray.adapters.diffusers_lora import DIFFUSERS_WEIGHTS_NAME, from_diffusers, to_diffusers
from peftray.errors import AdapterFormatError
from peftray.tuners.methods import config_from_dict


class _Folder:
    """Minimal file access to a local folder or an s3:// prefix."""

    def __init__(self, path: str | os.PathLike, storage_options: dict | None = None) -> None:
        self.path = str(path).rstrip("/")
        self.fs = None
        if self.path.startswith("s3://"):
            import s3fs  # only for s3:// paths, so tuners never need it

            if storage_options is None:
                from peftray.endpoints import load_config

                storage_options = load_config().storage_options()
            self.fs = s3fs.S3FileSystem(**storage_options)

    def join(self, name: str) -> str:
        return f"{self.path}/{name}"

    def names(self) -> list[str]:
        """The file names directly in the folder ([] when there is no folder)."""
        if self.fs:
            found = self.fs.ls(self.path, detail=False) if self.fs.isdir(self.path) else []
            return [p.rsplit("/", 1)[-1] for p in found]
        return sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.join(name)) if self.fs else os.path.isfile(self.join(name))

    def read(self, name: str) -> bytes:
        if self.fs:
            return self.fs.cat_file(self.join(name))
        return Path(self.join(name)).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        if self.fs:
            self.fs.pipe_file(self.join(name), data)
            return
        os.makedirs(self.path, exist_ok=True)
        tmp = self.join(f".{name}.tmp")
        Path(tmp).write_bytes(data)
        os.replace(tmp, self.join(name))  # never leave a half-written file under the real name


def read_adapter_config(path: str | os.PathLike, storage_options: dict | None = None):
    """The `PeftConfig` in `path/adapter_config.json` (AdapterFormatError if missing or not JSON)."""
    folder = _Folder(path, storage_options)
    return _read_config(folder)


def _read_config(folder: _Folder):
    if not folder.exists(CONFIG_NAME):
        raise AdapterFormatError(f"no {CONFIG_NAME} in {folder.path}: not an adapter folder (or a wrong path).")
    return config_from_dict(parse_config(folder.read(CONFIG_NAME), folder.join(CONFIG_NAME)))


def read_adapter(path: str | os.PathLike, storage_options: dict | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config, state_dict) of the adapter in `path`, tensors keyed by their HF PEFT names."""
    folder = _Folder(path, storage_options)
    if not folder.exists(CONFIG_NAME) and folder.exists(DIFFUSERS_WEIGHTS_NAME):
        return _read_diffusers(folder)
    config = _read_config(folder)
    if not folder.exists(WEIGHTS_NAME):
        pickled = [n for n in folder.names() if is_pickle(n)]
        if pickled:
            raise AdapterFormatError(
                f"{folder.join(pickled[0])} is a pickle file; peftray never unpickles (it can run arbitrary code). "
                + SAFETENSORS_HINT)
        raise AdapterFormatError(f"no {WEIGHTS_NAME} in {folder.path}.")
    return config, load_safetensors_bytes(folder.read(WEIGHTS_NAME), folder.join(WEIGHTS_NAME))


def _read_diffusers(folder: _Folder) -> tuple[Any, dict[str, torch.Tensor]]:
    """A diffusers pipeline LoRA folder (only pytorch_lora_weights.safetensors) as (config, HF PEFT tensors)."""
    where = folder.join(DIFFUSERS_WEIGHTS_NAME)
    data = folder.read(DIFFUSERS_WEIGHTS_NAME)
    tensors = load_safetensors_bytes(data, where)
    (n,) = struct.unpack("<Q", data[:8])  # a valid file: load_safetensors_bytes checked its header
    config, state = from_diffusers(tensors, json.loads(data[8:8 + n]).get("__metadata__"), where)
    return config_from_dict(config), state


def load_safetensors_bytes(data: bytes, where: str = "adapter_model.safetensors") -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; a truncated or corrupt file raises AdapterFormatError naming it."""
    check_safetensors(io.BytesIO(data), len(data), where)
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{where} is truncated or corrupt ({len(data)} bytes): {exc}") from None


def write_adapter(path: str | os.PathLike, config: Any, state: dict[str, torch.Tensor], readme: str | None = None,
                  storage_options: dict | None = None) -> None:
    """Write adapter_config.json (sorted keys, indent 2, inference_mode true) and adapter_model.safetensors."""
    folder = _Folder(path, storage_options)
    data = config.to_dict()
    data["inference_mode"] = True
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    folder.write(WEIGHTS_NAME, st_save(tensors, metadata={"format": "pt"}))
    folder.write(CONFIG_NAME, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    if readme is not None and not folder.exists("README.md"):
        folder.write("README.md", readme.encode())


def model_card(base_model: str | None, method: str) -> str:
    """The README.md HF PEFT writes next to an adapter (YAML front matter that hubs read)."""
    lines = ["---"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["library_name: peft", "tags:"]
    if base_model:
        lines.append(f"- base_model:adapter:{base_model}")
    lines += [f"- {method.lower()}", "- transformers", "---", "", "# Adapter", "",
              f"A {method} adapter in the Hugging Face PEFT format, written by peftray.", ""]
    return "\n".join(lines)


def write_diffusers_lora(path: str | os.PathLike, config: Any, state: dict[str, torch.Tensor],
                         storage_options: dict | None = None,
                         text_encoder: tuple[Any, dict[str, torch.Tensor]] | None = None) -> None:
    """Write diffusers' pytorch_lora_weights.safetensors for a UNet adapter (what load_lora_weights reads), with
    the text encoder's adapter (config, state) beside it when given."""
    te = None if text_encoder is None else (text_encoder[0].to_dict(), text_encoder[1])
    tensors, metadata = to_diffusers(config.to_dict(), state, te)
    _Folder(path, storage_options).write(DIFFUSERS_WEIGHTS_NAME, st_save(tensors, metadata=metadata))
