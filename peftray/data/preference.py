"""Preference rows (`dataset.format: preference`) to token ids: a prompt, a chosen and a rejected completion.

Each field is a string or a chat message list. Strings are tokenized as TRL does for non-conversational
data: the prompt with the tokenizer's special tokens, each completion without them and ending in eos.
Messages are rendered with the tokenizer's chat template: the prompt with the generation prompt, each
completion as what `prompt + completion` adds to it. Truncation follows TRL's `max_prompt_length` rule:
when prompt + the longer completion exceed `max_seq_len`, the prompt keeps its last `max_prompt_len`
tokens, then both completions are cut to what is left.

A pair that cannot teach anything is skipped and counted, never trained silently: identical chosen and
rejected token ids, or a completion truncated to nothing. Rows that are wrong (a missing field, an
empty completion) are errors naming the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftray.errors import ConfigError
from peftray.jobspec import DatasetSpec


@dataclass
class Skipped:
    """Rows left out of training, by reason, with their row numbers in the source (1 = first)."""

    identical: list[int] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.identical or self.truncated)

    def counts(self) -> dict[str, float]:
        return {"data/skipped_identical": float(len(self.identical)),
                "data/skipped_truncated": float(len(self.truncated))}

    def describe(self, source: str) -> str:
        parts = []
        if self.identical:
            parts.append(f"{len(self.identical)} with chosen equal to rejected (rows {_rows(self.identical)})")
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated to nothing by dataset.max_seq_len "
                         f"(rows {_rows(self.truncated)})")
        return f"{source}: skipped " + "; ".join(parts)


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:8]))
    return shown + (", ..." if len(numbers) > 8 else "")


def encode_preferences(rows: list[dict], ds: DatasetSpec, tokenizer, numbers: list[int],
                       skipped: Skipped) -> list[dict[str, Any]]:
    """Tokenize preference rows; pairs that cannot teach are left out and recorded in `skipped`."""
    out = []
    for n, row in zip(numbers, rows):
        where = f"{ds.source} row {n}"
        prompt, chosen, rejected = _pair_ids(where, row, ds, tokenizer)
        prompt, chosen, rejected = truncate(prompt, chosen, rejected, ds.max_seq_len, ds.max_prompt_len)
        if not chosen or not rejected:
            skipped.truncated.append(n)
        elif chosen == rejected:
            skipped.identical.append(n)
        else:
            out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "row": n})
    return out


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_len: int,
             max_prompt: int | None) -> tuple[list[int], list[int], list[int]]:
    """TRL's rule: the prompt loses its start first (down to `max_prompt` tokens), then the completions their end."""
    if len(prompt) + max(len(chosen), len(rejected)) > max_len and max_prompt is not None:
        prompt = prompt[-max_prompt:]
    room = max(max_len - len(prompt), 0)
    return prompt, chosen[:room], rejected[:room]


def _pair_ids(where: str, row: dict, ds: DatasetSpec, tokenizer) -> tuple[list[int], list[int], list[int]]:
    values = {}
    for name, column in (("prompt_field", ds.prompt_field), ("chosen_field", ds.chosen_field),
                         ("rejected_field", ds.rejected_field)):
        if column not in row or row[column] is None:
            raise ConfigError(f"{where}: no `{column}` value (dataset.{name}); every preference row needs "
                              f"{ds.prompt_field!r}, {ds.chosen_field!r} and {ds.rejected_field!r}")
        value = row[column]
        if name != "prompt_field" and _empty(value):
            raise ConfigError(f"{where}: `{column}` is empty; a preference pair needs a non-empty chosen and "
                              "rejected completion. Fix or drop the row")
        values[name] = value
    prompt, chosen, rejected = values["prompt_field"], values["chosen_field"], values["rejected_field"]
    if any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        return _chat_ids(where, prompt, chosen, rejected, tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return (_ids(tokenizer, str(prompt), True), _ids(tokenizer, str(chosen), False) + eos,
            _ids(tokenizer, str(rejected), False) + eos)


def _empty(value: Any) -> bool:
    if isinstance(value, list):
        return not value or all(not str(m.get("content", "")).strip() for m in value if isinstance(m, dict))
    return not str(value).strip()


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _messages(where: str, value: Any, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise ConfigError(f"{where}: expected a string or a list of {{role, content}} messages, got {str(value)[:80]}")
    return value


def _chat_ids(where: str, prompt, chosen, rejected, tokenizer) -> tuple[list[int], list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}: chat messages need a tokenizer with a chat template; the base model's has none. "
                          "Use strings in the preference rows")
    prompt_msgs = _messages(where, prompt, "user")
    head = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    pieces = []
    for value in (chosen, rejected):
        full = tokenizer.apply_chat_template(prompt_msgs + _messages(where, value, "assistant"), tokenize=False)
        if not full.startswith(head):
            raise ConfigError(f"{where}: the chat template does not render prompt + completion as an extension of "
                              "the prompt; use strings for this model")
        pieces.append(_ids(tokenizer, full[len(head):], False))
    # like apply_chat_template(tokenize=True): the template writes any bos itself
    return _ids(tokenizer, head, False), pieces[0], pieces[1]
