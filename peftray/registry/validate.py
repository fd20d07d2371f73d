"""Checks an adapter folder before it is registered, and reads what the registry records about it.

Nothing here unpickles or imports torch: the format's names and checks are `peftray.adapters.format`'s.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftray.adapters import format as adapter_format
from peftray.adapters.format import CONFIG_NAME, SAFETENSORS_HINT, WEIGHTS_NAME, is_pickle
from peftray.errors import AdapterFormatError
from peftray.tuners.methods import method_entry

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
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFormatError(
            f"adapter folder {str(path)!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}. " + SAFETENSORS_HINT)
    check_safetensors(weights)
    digests = {r: sha256_file(p) for r, p in zip(rel, files)}
    return AdapterInfo(
        config=config, files=digests, sizes={r: p.stat().st_size for r, p in zip(rel, files)},
        content_sha256=content_digest(digests), method=method_of(config), rank=rank_of(config),
        target_modules=targets_of(config),
    )


def _refuse_pickles(path: Path, rel: list[str]) -> None:
    pickles = [r for r in rel if is_pickle(r)]
    if not pickles:
        return
    if WEIGHTS_NAME not in rel:
        raise AdapterFormatError(
            f"adapter folder {str(path)!r} holds only pickle weights ({', '.join(pickles)}); peftray refuses pickle "
            "files because loading them can run arbitrary code. " + SAFETENSORS_HINT)
    raise AdapterFormatError(
        f"adapter folder {str(path)!r} contains pickle file(s) {', '.join(pickles)} next to {WEIGHTS_NAME}; "
        "peftray never stores pickle files. Delete them and register again.")


def read_adapter_config(path: Path, rel: list[str]) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        nested = sorted({r.rsplit("/", 1)[0] for r in rel if r.endswith("/" + CONFIG_NAME)})
        hint = (f" It has one in the subfolder(s) {', '.join(nested)}: register that subfolder instead "
                "(HF PEFT saves a non-default adapter into <dir>/<adapter_name>/).") if nested else (
                " Point at the folder written by save_pretrained().")
        raise AdapterFormatError(f"adapter folder {str(path)!r} has no {CONFIG_NAME}.{hint}")
    config = adapter_format.parse_config(cfg_path.read_bytes(), str(cfg_path))
    adapter_format.check_peft_type(config, str(cfg_path))
    return config


def check_safetensors(path: Path) -> list[str]:
    """Parse the safetensors header; return the tensor names. Raises AdapterFormatError if truncated/corrupt."""
    with open(path, "rb") as fh:
        return adapter_format.check_safetensors(fh, path.stat().st_size, str(path))


def method_of(config: dict[str, Any]) -> str:
    """The job-spec method name an adapter config stands for (`dora` for LoRA with use_dora), from the table."""
    for spec in method_entry(config["peft_type"]).specs:
        if spec.describes(config):
            return spec.model_fields["method"].default
    return str(config["peft_type"]).lower()


def rank_of(config: dict[str, Any]) -> int | None:
    r = config.get("r")
    return int(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else None


def targets_of(config: dict[str, Any]) -> list[str]:
    tm = config.get("target_modules")
    if tm is None:
        return []
    return [tm] if isinstance(tm, str) else sorted(str(t) for t in tm)
