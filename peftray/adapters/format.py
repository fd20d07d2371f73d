"""The adapter folder format, torch-free: file names, refused pickle files, the safetensors header check,
adapter_config.json reading and the accepted `peft_type` names.

Both readers of adapter folders use it: `peftray.adapters.io` (which then loads the tensors with torch) and
`peftray.registry.validate` (which checks a folder before registering it and never imports torch). The
safetensors header is parsed by hand (8-byte little-endian length, then JSON): enough to know the file is
complete and to name its tensors.
"""

from __future__ import annotations

import json
import struct
from typing import IO, Any

from peftray.errors import AdapterFormatError
from peftray.tuners.methods import registered_methods

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Files that are (or may be) Python pickles (`adapter_model.bin`, `pytorch_model.bin`, ...): never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SAFETENSORS_HINT = "Re-save the adapter as safetensors (HF PEFT: save_pretrained(dir, safe_serialization=True))."
_MAX_HEADER = 100 * 1024 * 1024


def is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def peft_type_names() -> list[str]:
    """The `peft_type`s peftray reads: the tuners' registered methods."""
    return registered_methods()


def parse_config(raw: bytes | str, where: str) -> dict[str, Any]:
    """adapter_config.json's text as a dict; AdapterFormatError naming `where` if it is not a JSON object."""
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{where} must hold a JSON object, got {type(config).__name__}.")
    return config


def check_peft_type(config: dict[str, Any], where: str) -> str:
    """The config's `peft_type`, which must be a registered method's; AdapterFormatError naming `where` if not."""
    known = peft_type_names()
    if config.get("peft_type") not in known:
        raise AdapterFormatError(f"`peft_type` in {where} must be one of {known}, got {config.get('peft_type')!r}.")
    return config["peft_type"]


def check_safetensors(fh: IO[bytes], size: int, where: str) -> list[str]:
    """Parse the safetensors header of the open file `fh` (`size` bytes); return the tensor names.

    Raises:
        AdapterFormatError: not safetensors (a renamed pickle, say), truncated, or holding no tensors.
    """
    head = fh.read(8)
    if len(head) < 8:
        raise AdapterFormatError(f"{where} is not a safetensors file (only {size} bytes).")
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
        raise AdapterFormatError(
            f"{where} is not a readable safetensors file (header length {n} does not fit a {size}-byte file). "
            "It may be a pickle renamed to .safetensors, or truncated: re-save it with safetensors.")
    try:
        header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{where} has a corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{where} has a corrupt safetensors header (not a JSON object).")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise AdapterFormatError(f"{where} has a corrupt safetensors header (bad data_offsets).") from None
    if 8 + n + end > size:
        raise AdapterFormatError(
            f"{where} is truncated or corrupt: tensors need {8 + n + end} bytes, the file has {size}.")
    if not tensors:
        raise AdapterFormatError(f"{where} holds no tensors.")
    return sorted(tensors)
