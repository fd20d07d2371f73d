"""OpenAI chat fine-tuning JSONL: validated line by line and converted to the rows peftray's formats read.

Two kinds of file, told apart by the first line; every line must be of the same kind:

    supervised   {"messages": [{"role": "system"|"user"|"assistant"|..., "content": "..."}, ...]}
                 -> peftray `chat` rows {"messages": [{role, content}, ...]} (content parts joined to text)
    preference   {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
                  "non_preferred_output": [...]}
                 -> peftray `preference` rows {"prompt": [...messages], "chosen": [...], "rejected": [...]}

The first bad line is named (1 = first) with what was expected, before anything is stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from peftray.errors import ConfigError

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
SUPERVISED, PREFERENCE = "chat", "preference"
_EXAMPLE = {SUPERVISED: '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}',
            PREFERENCE: '{"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": '
                        '[{"role": "assistant", "content": "Hello"}], "non_preferred_output": '
                        '[{"role": "assistant", "content": "Go away"}]}'}


class FileLineError(ConfigError):
    """A line of an uploaded file that is not what OpenAI's fine-tuning format expects (400, param `file`)."""

    param = "file"


@dataclass(frozen=True)
class Converted:
    kind: str  # chat | preference
    rows: list[dict[str, Any]]

    def jsonl(self) -> bytes:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows).encode()


def convert_file(data: bytes, filename: str) -> Converted:
    """Validate an upload and convert it. Raises FileLineError naming the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileLineError(f"{filename}: not UTF-8 text (byte {exc.start}); upload a JSONL file") from None
    kind, rows = None, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = _json_line(line, number, filename)
        kind = kind or (PREFERENCE if "preferred_output" in row else SUPERVISED)
        try:
            rows.append(_preference(row) if kind == PREFERENCE else _supervised(row))
        except ValueError as exc:
            raise FileLineError(f"{filename} line {number}: {exc}. Expected a {kind} row like {_EXAMPLE[kind]}") from None
    if not rows:
        raise FileLineError(f"{filename}: no rows; expected one JSON object per line like {_EXAMPLE[SUPERVISED]}")
    return Converted(kind, rows)


def _json_line(line: str, number: int, filename: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise FileLineError(f"{filename} line {number}: not valid JSON ({exc}); each line must be one JSON "
                            "object") from None
    if not isinstance(row, dict):
        raise FileLineError(f"{filename} line {number}: expected a JSON object, got {type(row).__name__}")
    return row


def _supervised(row: dict[str, Any]) -> dict[str, Any]:
    unknown = set(row) - {"messages", "tools", "parallel_tool_calls", "functions"}
    if unknown:
        raise ValueError(f"unexpected key(s) {', '.join(sorted(map(repr, unknown)))}")
    messages = _messages(row.get("messages"), "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("`messages` has no assistant message: nothing to learn")
    return {"messages": messages}


def _preference(row: dict[str, Any]) -> dict[str, Any]:
    unknown = set(row) - {"input", "preferred_output", "non_preferred_output"}
    if unknown:
        raise ValueError(f"unexpected key(s) {', '.join(sorted(map(repr, unknown)))}")
    source = row.get("input")
    if not isinstance(source, dict):
        raise ValueError("`input` must be an object with `messages`")
    prompt = _messages(source.get("messages"), "input.messages")
    chosen = _messages(row.get("preferred_output"), "preferred_output")
    rejected = _messages(row.get("non_preferred_output"), "non_preferred_output")
    for name, out in (("preferred_output", chosen), ("non_preferred_output", rejected)):
        if any(m["role"] != "assistant" for m in out):
            raise ValueError(f"`{name}` must hold assistant messages only")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"`{where}` must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"`{where}[{i}]` must be an object with `role` and `content`")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"`{where}[{i}].role` must be one of {', '.join(ROLES)}; got {role!r}")
        out.append({"role": role, "content": _text(message.get("content"), f"{where}[{i}].content")})
    return out


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)  # content parts: only text ones can be trained on
    raise ValueError(f"`{where}` must be a string or a list of text parts; got {str(content)[:60]}")
