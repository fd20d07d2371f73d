"""Checks an adapter folder before it is registered, and reads what the registry records about it.

Nothing here unpickles or imports torch: the safetensors header is parsed by hand (8-byte little-endian
length, then JSON), which is enough to know the file is complete and names its tensors.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftray.errors import AdapterFormatError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TYPES = {"LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"}
# Files that are (or may be) Python pickles: peftray never stores or loads them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 1 << 20


@dataclass
class AdapterInfo:
    """What validation learned about an adapter folder."""

    config: dict[str, Any]
    files: dict[str, str]  # relative posix path -> sha256
    sizes: dict[str, int]
    content_sha256: str
    method: str
    rank: int | None
    target_modules: list[str]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_digest(files: dict[str, str]) -> str:
    """One digest for a whole folder: sha256 over the sorted `path\\0sha256\\n` lines."""
    lines = "".join(f"{p}\0{s}\n" for p, s in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def validate_adapter_dir(path: Path) -> AdapterInfo:
    """Validate `path` as an HF-PEFT-format adapter folder; raise AdapterFormatError saying what to fix."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(f"adapter folder {str(path)!r} does not exist or is not a folder.")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    rel = [p.relative_to(path).as_posix() for p in files]
    _refuse_pickles(path, rel)
    config = read_adapter_config(path, rel)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFormatError(
            f"adapter folder {str(path)!r} has {CONFIG_FILE} but no {WEIGHTS_FILE}. "
            "Save the adapter with safetensors (HF PEFT: save_pretrained(..., safe_serialization=True)).")
    check_safetensors(weights)
    digests = {r: sha256_file(p) for r, p in zip(rel, files)}
    return AdapterInfo(
        config=config, files=digests, sizes={r: p.stat().st_size for r, p in zip(rel, files)},
        content_sha256=content_digest(digests), method=method_of(config), rank=rank_of(config),
        target_modules=targets_of(config),
    )


def _refuse_pickles(path: Path, rel: list[str]) -> None:
    pickles = [r for r in rel if r.lower().endswith(PICKLE_SUFFIXES)]
    if not pickles:
        return
    if WEIGHTS_FILE not in rel:
        raise AdapterFormatError(
            f"adapter folder {str(path)!r} holds only pickle weights ({', '.join(pickles)}); peftray refuses pickle "
            "files because loading them can run arbitrary code. Re-save the adapter as safetensors "
            "(HF PEFT: save_pretrained(dir, safe_serialization=True)).")
    raise AdapterFormatError(
        f"adapter folder {str(path)!r} contains pickle file(s) {', '.join(pickles)} next to {WEIGHTS_FILE}; "
        "peftray never stores pickle files. Delete them and register again.")


def read_adapter_config(path: Path, rel: list[str]) -> dict[str, Any]:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        nested = sorted({r.rsplit("/", 1)[0] for r in rel if r.endswith("/" + CONFIG_FILE)})
        hint = (f" It has one in the subfolder(s) {', '.join(nested)}: register that subfolder instead "
                "(HF PEFT saves a non-default adapter into <dir>/<adapter_name>/).") if nested else (
                " Point at the folder written by save_pretrained().")
        raise AdapterFormatError(f"adapter folder {str(path)!r} has no {CONFIG_FILE}.{hint}")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}.")
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterFormatError(
            f"`peft_type` in {cfg_path} must be one of {sorted(PEFT_TYPES)}, got {peft_type!r}.")
    return config


def check_safetensors(path: Path) -> list[str]:
    """Parse the safetensors header; return the tensor names. Raises AdapterFormatError if truncated/corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise AdapterFormatError(f"{path} is not a safetensors file (only {size} bytes).")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise AdapterFormatError(
                f"{path} is not a readable safetensors file (header length {n} does not fit a {size}-byte file). "
                "It may be a pickle renamed to .safetensors, or truncated: re-save it with safetensors.")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdapterFormatError(f"{path} has a corrupt safetensors header: {exc}") from exc
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if 8 + n + end > size:
        raise AdapterFormatError(f"{path} is truncated: tensors need {8 + n + end} bytes, the file has {size}.")
    if not tensors:
        raise AdapterFormatError(f"{path} holds no tensors.")
    return sorted(tensors)


def method_of(config: dict[str, Any]) -> str:
    peft_type = config["peft_type"]
    if peft_type == "LORA" and config.get("use_dora"):
        return "dora"
    return peft_type.lower()


def rank_of(config: dict[str, Any]) -> int | None:
    r = config.get("r") if config["peft_type"] == "LORA" else None
    return int(r) if isinstance(r, (int, float)) else None


def targets_of(config: dict[str, Any]) -> list[str]:
    tm = config.get("target_modules")
    if tm is None:
        return []
    return [tm] if isinstance(tm, str) else sorted(str(t) for t in tm)
