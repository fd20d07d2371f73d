"""Rows to training examples: token ids plus labels, with the loss masked where the model should not learn.

Every example is a dict: `{"input_ids": [...], "labels": [...]}` for causal LMs (label -100 = not in the
loss), `{"input_ids": [...], "label": k}` for classification.
- text: every token is in the loss; with packing, rows are joined (eos between) and cut into max_seq_len blocks;
- instruction: prompt tokens are masked, response tokens (+ eos) are learned;
- chat: the tokenizer's chat template renders the messages; only assistant turns are learned (the
  generation prompt that opens each assistant turn is masked too);
- classification: text -> label id (names mapped through `dataset.labels`, or sorted when not given);
- image_caption, image_classification: see peftray.data.images.
"""

from __future__ import annotations

from typing import Any

from peftray.errors import ConfigError
from peftray.jobspec import DatasetSpec

IGNORE = -100


def check_columns(rows: list[dict], ds: DatasetSpec, columns: list[str]) -> None:
    """Fail fast when the columns the format needs are missing; name the ones that exist."""
    need = {
        "text": [("text_field", ds.text_field)],
        "instruction": [("prompt_field", ds.prompt_field), ("response_field", ds.response_field)],
        "chat": [("messages_field", ds.messages_field)],
        "classification": [("text_field", ds.text_field), ("label_field", ds.label_field)],
        "preference": [("prompt_field", ds.prompt_field), ("chosen_field", ds.chosen_field),
                       ("rejected_field", ds.rejected_field)],
        "image_caption": [("image_field", ds.image_field), ("caption_field", ds.caption_field)],
        "image_classification": [("image_field", ds.image_field), ("label_field", ds.label_field)],
    }[ds.format]
    for field, column in need:
        if column not in columns:
            raise ConfigError(
                f"`dataset.{field}` is {column!r}, but {ds.source} has no such column; its columns are "
                f"{', '.join(columns)}. Pass dataset.{field}=<one of those>")


def label_names(rows: list[dict], ds: DatasetSpec) -> list[str]:
    """The class names in label-id order: `dataset.labels`, else the sorted distinct labels of the rows."""
    if ds.labels:
        return list(ds.labels)
    values = {row[ds.label_field] for row in rows}
    if all(isinstance(v, int) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values)


def encode_rows(rows: list[dict], ds: DatasetSpec, tokenizer, labels: list[str] | None = None,
                numbers: list[int] | None = None) -> list[dict[str, Any]]:
    """Tokenize rows in the dataset's format.

    `labels` (classification) maps names to ids; `numbers` are the rows' numbers in the source file
    (1 = first), quoted in errors.
    """
    numbers = numbers or list(range(1, len(rows) + 1))
    if ds.format == "text":
        return _text(rows, ds, tokenizer)
    where = [f"{ds.source} row {n}" for n in numbers]
    if ds.format == "classification":
        return [_classification(w, row, ds, tokenizer, labels or []) for w, row in zip(where, rows)]
    encode = _instruction if ds.format == "instruction" else _chat
    return [encode(w, row, ds, tokenizer) for w, row in zip(where, rows)]


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _text(rows: list[dict], ds: DatasetSpec, tokenizer) -> list[dict[str, Any]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    seqs = [_ids(tokenizer, str(row[ds.text_field]), True) + eos for row in rows]
    if not ds.packing:
        return [{"input_ids": s[: ds.max_seq_len], "labels": s[: ds.max_seq_len]} for s in seqs]
    stream = [tok for s in seqs for tok in s]
    n = ds.max_seq_len
    # the short tail block is kept: on small datasets dropping it loses a noticeable share of the tokens
    return [{"input_ids": stream[i:i + n], "labels": stream[i:i + n]} for i in range(0, len(stream), n)
            if len(stream[i:i + n]) > 1]


def _too_long(where: str, what: str, n: int, ds: DatasetSpec) -> ConfigError:
    return ConfigError(
        f"{where}: the {what} is {n} tokens, not shorter than `dataset.max_seq_len` {ds.max_seq_len}, "
        f"so no response token would be learned. Raise dataset.max_seq_len or shorten the row")


def _instruction(where: str, row: dict, ds: DatasetSpec, tokenizer) -> dict[str, Any]:
    prompt = _ids(tokenizer, str(row[ds.prompt_field]), True)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    response = _ids(tokenizer, str(row[ds.response_field]), False) + eos
    if len(prompt) >= ds.max_seq_len:
        raise _too_long(where, "prompt", len(prompt), ds)
    ids = (prompt + response)[: ds.max_seq_len]
    labels = ([IGNORE] * len(prompt) + response)[: ds.max_seq_len]
    return {"input_ids": ids, "labels": labels}


def _chat(where: str, row: dict, ds: DatasetSpec, tokenizer) -> dict[str, Any]:
    messages = row[ds.messages_field]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ConfigError(f"{where}: `{ds.messages_field}` must be a list of {{role, content}} "
                          f"messages, got {str(messages)[:80]}")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("dataset.format 'chat' needs a tokenizer with a chat template; the base model's has none")
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            opened = _render(tokenizer, messages[:k], generation_prompt=True)
            _append(ids, labels, tokenizer, _suffix(opened, rendered, where), learn=False)
            rendered = opened
        full = _render(tokenizer, messages[: k + 1], generation_prompt=False)
        _append(ids, labels, tokenizer, _suffix(full, rendered, where), learn=message["role"] == "assistant")
        rendered = full
    first_learned = next((i for i, lab in enumerate(labels) if lab != IGNORE), None)
    if first_learned is None:
        raise ConfigError(f"{where}: no assistant message, so nothing to learn; add one or drop the row")
    if first_learned >= ds.max_seq_len:
        raise _too_long(where, "conversation before the first assistant turn", first_learned, ds)
    return {"input_ids": ids[: ds.max_seq_len], "labels": labels[: ds.max_seq_len]}


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _suffix(text: str, prefix: str, where: str) -> str:
    # Tokenizing turn by turn keeps the mask exact; it needs a template whose renderings extend each other.
    if not text.startswith(prefix):
        raise ConfigError(f"{where}: the tokenizer's chat template does not render conversations "
                          "incrementally (a prefix of the messages is not a prefix of the text); use format "
                          "'instruction' for this model")
    return text[len(prefix):]


def _append(ids: list[int], labels: list[int], tokenizer, text: str, learn: bool) -> None:
    if not text:
        return
    # like HF's apply_chat_template(tokenize=True): the template writes any bos itself
    piece = _ids(tokenizer, text, special=False)
    ids.extend(piece)
    labels.extend(piece if learn else [IGNORE] * len(piece))


def label_id(where: str, value: Any, ds: DatasetSpec, names: list[str]) -> int:
    """A row's label as its id in `names` (an int label is its own id when `dataset.labels` is not given)."""
    if isinstance(value, int) and not ds.labels and 0 <= value < len(names):
        return value
    if str(value) in names:
        return names.index(str(value))
    raise ConfigError(f"{where}: label {value!r} is not one of `dataset.labels` {names}; "
                      "add it to dataset.labels or fix the row")


def _classification(where: str, row: dict, ds: DatasetSpec, tokenizer, names: list[str]) -> dict[str, Any]:
    label = label_id(where, row[ds.label_field], ds, names)
    enc = tokenizer(str(row[ds.text_field]), truncation=True, max_length=ds.max_seq_len)
    return {"input_ids": list(enc["input_ids"]), "label": label}
