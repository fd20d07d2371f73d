"""Structured output: a JSON schema enforced while decoding, one grammar matcher per row (llguidance).

Why llguidance (over xgrammar): one abi3 wheel with no other dependency (xgrammar pulls a TVM FFI runtime),
masks computed on the CPU in tens of microseconds without a JIT step, full JSON-schema support, and a
matcher per row, so constrained and free rows share the same mixed-adapter forward pass: the mask only
touches that row's logits before sampling.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any, Optional

import numpy as np
import torch

from peftray.errors import ConfigError

# Compact JSON: with flexible whitespace a weak model may emit blanks until max_tokens.
_DEFAULTS = {"whitespace_flexible": False}


class GrammarCompiler:
    """Builds per-row matchers for one tokenizer (its llguidance view is made once, on first use)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltok = None
        self._lock = threading.Lock()
        self._grammars: dict[str, str] = {}  # schema JSON -> compiled grammar text

    def _ll(self):
        with self._lock:
            if self._lltok is None:
                import llguidance.hf

                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer)
            return self._lltok

    def matcher(self, schema: dict[str, Any], field: str = "response_format") -> "RowGrammar":
        """A fresh matcher for `schema`; ConfigError (400) naming `field` when the schema is not usable."""
        import llguidance

        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_DEFAULTS)
            except Exception as exc:  # noqa: BLE001 - llguidance raises ValueError/RuntimeError variants
                raise ConfigError(f"`{field}`: the JSON schema cannot be enforced: {exc}") from None
            msg = llguidance.LLMatcher.validate_grammar(grammar, self._ll())  # "" when valid
            if msg:
                raise ConfigError(f"`{field}`: the JSON schema cannot be enforced: {msg}")
            self._grammars[key] = grammar
        m = llguidance.LLMatcher(self._ll(), grammar)
        if m.is_error():
            raise ConfigError(f"`{field}`: the JSON schema cannot be enforced: {m.get_error()}")
        return RowGrammar(m, self.vocab_size)


class RowGrammar:
    """One row's matcher: what it allows next (see `mask_rows`), and the sampled token consumed."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self.m, self.vocab_size = matcher, vocab_size

    def accept(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise ConfigError(f"the grammar rejected token {token}: {self.m.get_error()}")

    @property
    def finished(self) -> bool:
        """The value is complete and nothing but end-of-sequence may follow."""
        return self.m.is_stopped()


def mask_rows(grammars: list[RowGrammar], logits: torch.Tensor) -> torch.Tensor:
    """`logits` [n, vocab] with each row's forbidden tokens set to -inf, row i by `grammars[i]` (a new tensor).

    A decode step masks all its constrained rows at once: each matcher fills its row of one bitmask, then one
    unpack and one `masked_fill` for the batch (per row, those few small torch ops cost more than the grammar).
    """
    import llguidance.torch as lt

    bits = lt.allocate_token_bitmask(len(grammars), grammars[0].vocab_size)
    for i, g in enumerate(grammars):
        lt.fill_next_token_bitmask(g.m, bits, i)
    allowed = _unpack(bits, logits.shape[-1])
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def _unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    """The 32-bit words of llguidance bitmasks ([..., words]) as `n` booleans per row ([..., n]; bit j of word i =
    token 32 i + j; tokens past the words are forbidden).

    One `numpy.unpackbits` over the words' bytes (little-endian: byte k of word i holds tokens 32 i + 8 k ...,
    least significant bit first), where torch's shift, and, cast and flatten cost ~35 µs a row on this CPU.
    """
    if sys.byteorder == "little" and words.device.type == "cpu":
        packed = words.contiguous().numpy().view(np.uint8)
        bits = torch.from_numpy(np.unpackbits(packed, axis=-1, bitorder="little")).view(torch.bool)
    else:
        shifts = torch.arange(32, dtype=torch.int32, device=words.device)
        bits = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)
    if bits.shape[-1] >= n:
        return bits[..., :n]
    pad = torch.zeros(*bits.shape[:-1], n - bits.shape[-1], dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=-1)


def tool_schema(tools: list[dict], choice: Any) -> Optional[dict]:
    """The JSON schema a forced tool call is decoded under, or None when the model may answer in text.

    `choice` is OpenAI's `tool_choice`: "none" | "auto" (free text) | "required" (any of the tools) | a named
    function. The decoded object is `{"name": ..., "arguments": {...}}`.
    """
    if not tools or choice in (None, "none", "auto"):
        return None
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in by_name:
            raise ConfigError(f"`tool_choice.function.name`: {name!r} is not one of `tools` ({', '.join(by_name)}).")
        picks = [by_name[name]]
    else:
        picks = list(by_name.values())
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": f["name"]},
                               "arguments": f.get("parameters") or {"type": "object"}}} for f in picks]
    return options[0] if len(options) == 1 else {"anyOf": options}
