"""Loading a job spec: YAML file, s3:// object, text or mapping, `key=value` overrides, readable errors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftray.errors import ConfigError
from peftray.jobspec.schema import _SLUG_HELP, _SPEC_MODELS, METHODS, JobSpec


def load_spec(path_or_text: str | Path | Mapping, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load and validate a job spec.

    Args:
        path_or_text: a YAML file path, an `s3://` URI of one, YAML text, or an already-parsed mapping.
        overrides: `a.b=value` strings; each value is parsed as a YAML scalar (`5`, `1e-3`, `true`, `[a, b]`).

    Returns:
        The validated `JobSpec`.

    Raises:
        ConfigError: unreadable file, bad YAML, a bad override, or a field that fails validation; the
            message names the field path as written, the value received and the allowed values.
    """
    data = _read(path_or_text)
    for item in overrides:
        _apply_override(data, item)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def pin_local_path(value: Any, roots: tuple[Path, ...] = ()) -> Any:
    """`value` made absolute when it names a local file or folder that exists under one of `roots` (first match;
    default: the working directory); anything else (a hub id like `gpt2`, an `s3://` URI, a non-string) as given.

    Specs name local paths relative to where the user stands, but what reads them (the job's driver, a Serve
    replica) runs elsewhere.
    """
    if not isinstance(value, str) or "://" in value or Path(value).is_absolute():
        return value
    for root in roots or (Path.cwd(),):
        if (Path(root) / value).exists():
            return str((Path(root) / value).resolve())
    return value


def _read(src: str | Path | Mapping) -> dict[str, Any]:
    if isinstance(src, Mapping):
        return json.loads(json.dumps(dict(src)))  # a deep copy that overrides may change
    text = str(src)
    if isinstance(src, Path) or ("\n" not in text and (text.endswith((".yaml", ".yml", ".json"))
                                                       or text.startswith("s3://"))):
        text = _read_file(text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"job spec is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"job spec must be a YAML mapping of fields, got {type(data).__name__}: {text[:80]!r}")
    return data


def _read_file(path: str) -> str:
    if path.startswith("s3://"):
        from peftray.endpoints import load_config

        fs = load_config().s3fs()
        try:
            return fs.cat_file(path[len("s3://"):]).decode()
        except FileNotFoundError:
            raise ConfigError(f"job spec {path} does not exist in object storage") from None
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"job spec file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read job spec file {path}: {exc}") from None


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key=value, e.g. training.max_steps=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if isinstance(child, str) and i == 0 and part in ("base_model", "adapter"):
            child = node[part] = {"path" if part == "base_model" else "method": child}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: `{'.'.join(parts[:i + 1])}` is {child!r}, not a section")
        node = child
    node[parts[-1]] = value


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `field.path`: what is wrong, the value received, the allowed values."""
    lines = [_describe(err) for err in exc.errors(include_url=False)]
    head = "invalid job spec" if len(lines) == 1 else f"invalid job spec ({len(lines)} problems)"
    return head + ":\n  " + "\n  ".join(lines)


def _user_path(loc: tuple) -> list[str]:
    # pydantic puts the union tag into the location (adapter.lora.r); the user wrote adapter.r
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] == "adapter" and parts[1] in METHODS:
        del parts[1]
    return [p for p in parts if not p.startswith(("function-", "list[", "literal[", "str", "int"))] or parts


def _describe(err: dict[str, Any]) -> str:
    path = ".".join(_user_path(err["loc"]))
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    shown = json.dumps(value, default=str)[:120]
    if kind == "extra_forbidden":
        allowed = _allowed_fields(err["loc"][:-1])
        return f"unknown field `{path}` (value {shown}); allowed fields here: {', '.join(allowed)}"
    if kind == "missing":
        return f"`{path}` is required; add it to the job spec"
    if kind == "union_tag_invalid":
        return f"`{path}.method` must be one of {', '.join(METHODS)}; got {json.dumps(ctx.get('tag'))}"
    if kind == "union_tag_not_found":
        return f"`{path}.method` is required; one of {', '.join(METHODS)}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        msg = f"must be a safe name ({_SLUG_HELP})"
    where = f"`{path}`" if path else "job spec"
    if isinstance(value, dict):  # a cross-field check: its message already names the fields
        return f"{where}: {msg}"
    return f"{where}: {msg}; got {shown}. Set {path} in the job spec or pass {path}=..."


def _allowed_fields(loc: tuple) -> list[str]:
    model: Any = JobSpec
    parts = [str(p) for p in loc]
    i = 0
    while i < len(parts):
        if model is JobSpec and parts[i] == "adapter":
            if i + 1 < len(parts) and parts[i + 1] in _SPEC_MODELS:
                model, i = _SPEC_MODELS[parts[i + 1]], i + 2
                continue
            return ["method"]
        field = model.model_fields.get(parts[i])
        model = _model_of(field.annotation) if field else None
        if model is None:
            return []
        i += 1
    return sorted(model.model_fields)


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
