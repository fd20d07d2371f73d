"""OpenAI's response objects from the engine's events: choices, logprobs, tool calls, stream chunks, usage."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Choice:
    """What one choice (one prompt x one of `n`) has produced so far."""

    index: int
    prompt_index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # {"token", "logprob", "top": [[token, logprob]]}
    prompt_text: str = ""
    last: dict = field(default_factory=dict)

    def add(self, ev: dict) -> None:
        self.text.append(ev.get("text", ""))
        self.logprobs.extend(ev.get("logprobs") or [])
        self.prompt_text = ev.get("prompt_text", self.prompt_text)
        self.last = ev

    @property
    def finish_reason(self) -> str:
        return self.last.get("finish_reason") or "stop"


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t: lp for t, lp in e["top"]} for e in entries], "text_offset": offsets}


def chat_logprobs(entries: list[dict]) -> dict:
    def one(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


def tool_call(text: str, tools: list[dict]) -> Optional[dict]:
    """OpenAI's tool call from a decoded `{"name", "arguments"}` object; None when the text is not one (with
    `tool_choice: auto` the model answered in text; a forced call cut by max_tokens stays text too)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    names = {t["function"]["name"] for t in tools}
    if not (isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments"), dict)):
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(obj["arguments"])}}


def usage(choices: list[Choice]) -> dict:
    """Each prompt counted once (its `n` choices share it), every choice's completion tokens."""
    prompts = {c.prompt_index: int(c.last.get("prompt_tokens", 0)) for c in choices}
    p, c = sum(prompts.values()), sum(int(ch.last.get("completion_tokens", 0)) for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def final(rid: str, model: str, chat: bool, choices: list[Choice], tools: Optional[list[dict]] = None,
          want_logprobs: bool = False) -> dict:
    out = []
    for ch in choices:
        text = "".join(ch.text)
        lps = None
        if want_logprobs:
            lps = chat_logprobs(ch.logprobs) if chat else completion_logprobs(ch.logprobs, len(ch.prompt_text))
        if not chat:
            out.append({"index": ch.index, "text": ch.prompt_text + text, "logprobs": lps,
                        "finish_reason": ch.finish_reason})
            continue
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        reason = ch.finish_reason
        call = tool_call(text, tools) if tools and reason == "stop" else None
        if call is not None:
            message.update(content=None, tool_calls=[call])
            reason = "tool_calls"
        out.append({"index": ch.index, "message": message, "logprobs": lps, "finish_reason": reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": out, "usage": usage(choices)}


def chunk(rid: str, model: str, chat: bool, index: int, delta: dict, reason: Optional[str] = None,
          logprobs: Optional[dict] = None, text: str = "") -> str:
    if chat:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    else:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [choice]}
    return f"data: {json.dumps(obj)}\n\n"


def usage_chunk(rid: str, model: str, chat: bool, choices: list[Choice]) -> str:
    obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [], "usage": usage(choices)}
    return f"data: {json.dumps(obj)}\n\n"
