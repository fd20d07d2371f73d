"""Turning a request body into a validated `JobSpec`, refusing everything that could run code on the cluster.

Order of checks: body size (while reading), JSON or YAML syntax (YAML without anchors/aliases, so a 1 MiB
"billion laughs" document cannot expand in memory), keys that would name a command or a runtime environment
(anywhere in the document, with a message saying why), then the spec schema (`load_spec`, extra fields
forbidden, names restricted to safe slugs, so `../x` never becomes an S3 prefix or a model name).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import yaml

from peftray.errors import ConfigError, PeftrayError
from peftray.jobspec import JobSpec, load_spec

# Keys with which a spec could choose what runs on the cluster. The service sets all of these itself.
EXECUTION_KEYS = frozenset({
    "runtime_env", "entrypoint", "entrypoint_num_cpus", "command", "commands", "cmd", "setup_commands",
    "env_vars", "pip", "uv", "conda", "container", "image_uri", "py_modules", "py_executable", "working_dir",
    "script",
})


# Deeper than any real spec (5 levels) by far; a parser or validator recursing 1000 levels deep would fail
# with RecursionError (a 500) instead of telling the sender what is wrong.
MAX_DEPTH = 32


class BodyTooLargeError(PeftrayError):
    code = "body_too_large"
    http_status = 413


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes without reading further than needed."""
    if content_length and content_length.isdigit() and int(content_length) > limit:
        raise BodyTooLargeError(f"request body is {int(content_length)} bytes; the limit is {limit} bytes. "
                                "A job spec is small: reference datasets and models by path or URI instead "
                                "of inlining them.")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise BodyTooLargeError(f"request body exceeds the limit of {limit} bytes. Reference datasets and "
                                    "models by path or URI instead of inlining them.")
    return bytes(body)


class _NoAliasLoader(yaml.SafeLoader):
    """A SafeLoader that rejects anchors and aliases (`&a`, `*a`)."""

    def compose_node(self, parent, index):  # noqa: D102
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML aliases (*{event.anchor}) are not accepted in a job spec: write the value out "
                              f"(line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def parse_document(body: bytes, content_type: str | None) -> dict[str, Any]:
    """A JSON (content type `application/json`) or YAML body as a mapping."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("job spec must be UTF-8 text (JSON or YAML)") from None
    if not text.strip():
        raise ConfigError("empty request body: send a job spec as JSON or YAML")
    is_json = (content_type or "").split(";")[0].strip().lower() == "application/json"
    kind = "JSON" if is_json else "YAML"
    try:
        data = json.loads(text) if is_json else yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - SafeLoader
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"job spec is not valid {kind}: {exc}") from None
    except RecursionError:
        raise too_deep(kind) from None
    check_depth(data, kind)
    if not isinstance(data, dict):
        raise ConfigError(f"job spec must be a mapping of fields, got {type(data).__name__}")
    return data


def too_deep(kind: str) -> ConfigError:
    return ConfigError(f"job spec {kind} is nested more than {MAX_DEPTH} levels deep; a job spec has about 5. "
                       "Send the spec's fields as documented (`peftray submit --dry-run` checks a spec).")


def check_depth(data: Any, kind: str) -> None:
    """Raise ConfigError when `data` nests deeper than MAX_DEPTH (checked without recursion)."""
    todo = [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise too_deep(kind)
            todo += [(v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)]


def reject_execution_keys(data: Any, path: str = "") -> None:
    """Raise ConfigError naming the first key that would choose a command or runtime environment."""
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if str(key) in EXECUTION_KEYS:
                raise ConfigError(
                    f"`{where}` is not allowed in a job spec: the service builds the Ray entrypoint and runtime "
                    "environment itself, because a command or runtime_env from a request would run arbitrary "
                    f"code on the cluster. Remove `{where}`.")
            reject_execution_keys(value, where)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            reject_execution_keys(item, f"{path}[{i}]")


def validate_spec(body: bytes, content_type: str | None) -> JobSpec:
    """Parse and validate a job spec body. Raises ConfigError (400) with the field named."""
    data = parse_document(body, content_type)
    reject_execution_keys(data)
    return load_spec(data)  # a mapping: load_spec never treats request text as a file path
