"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /v1/images/generations,
/v1/classify, errors, SSE streaming.

The routes are thin: check the key, validate the body (pydantic, unknown fields refused), resolve `model`,
hand the job to the backend (the Serve ingress sends it to an engine replica) and shape its events into
OpenAI's JSON or server-sent events ending with `data: [DONE]`. Every error is OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`) with the matching status and, for 429/503, `Retry-After`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from typing import Any, AsyncIterator, Optional, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from peftray.serve import openai_shape as shape
from peftray.serve.openai_errors import (  # noqa: F401 - the error helpers stay importable from here
    RequestTimeout, _RemoteError, _with_deadline, error_body, error_response, from_exception, wrong_task,
)
from peftray.serve.openai_classify import serve_classify
from peftray.serve.openai_images import serve_images
from peftray.serve.openai_schema import ChatRequest, ClassifyRequest, CompletionRequest, ImageRequest, _Common
from peftray.serve.watch import ModelResolver, Target


class Backend(Protocol):
    """What the routes need: a resolver and a way to run a job (an async stream of event dicts)."""

    resolver: ModelResolver
    api_key: Optional[str]
    default_max_tokens: int
    request_timeout_s: float

    def run(self, target: Target, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def call(self, fn, *args): ...


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errs = exc.errors()
    if errs and errs[0].get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(errs[0].get("ctx", {}).get("error", "")), None
    parts, param = [], None
    for e in errs:
        loc = [str(p) for p in e.get("loc", []) if p != "body"]
        param = param or (".".join(loc) or None)
        parts.append(f"`{'.'.join(loc) or 'body'}`: {e.get('msg')} (got {e.get('input')!r})")
    return "invalid request: " + "; ".join(parts)[:2000], param


# --- the app -------------------------------------------------------------------------------------------
_BACKENDS: list = []  # the Backend of this process (the Serve ingress replica sets it when it starts)


def set_backend(backend) -> None:
    _BACKENDS[:] = [backend]


def current_backend():
    """The Backend set by `set_backend` (a module-level function: Ray pickles it by reference, so every copy
    of the app in a replica process reads the same module state)."""
    if not _BACKENDS:
        raise RuntimeError("the serving backend is not started yet")
    return _BACKENDS[0]


def make_app(get_backend=current_backend) -> FastAPI:
    """The FastAPI app; `get_backend()` returns the Backend (default: the one `set_backend` registered)."""
    app = FastAPI(title="peftray serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request", param)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        key = get_backend().api_key
        if key and not request.url.path.endswith("/health"):
            got = request.headers.get("authorization", "")
            token = got[7:].strip() if got.lower().startswith("bearer ") else ""
            if not token or not hmac.compare_digest(token.encode(), key.encode()):
                why = "no API key was given" if not token else "the API key is not valid"
                return error_response(401, f"Unauthorized: {why}. Send `Authorization: Bearer <key>` with the key "
                                           "of this deployment (PEFTRAY_SERVE_API_KEY).", "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def _health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def _models():
        backend = get_backend()
        try:
            return {"object": "list", "data": await backend.call(backend.resolver.listed)}
        except Exception as exc:  # noqa: BLE001
            return from_exception(exc)

    @app.get("/metrics")
    async def _metrics():
        backend = get_backend()
        text = await backend.metrics_text() if hasattr(backend, "metrics_text") else b""
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def _completions(body: CompletionRequest):
        dmt = get_backend().default_max_tokens
        jobs = [(i, {"prompt": p, "echo": body.echo, "params": body.params(dmt, j)})
                for i, p in enumerate(body.prompts()) for j in range(body.n)]  # OpenAI's order: prompt-major
        return await _serve(get_backend(), body, jobs, chat=False)

    @app.post("/v1/chat/completions")
    async def _chat(body: ChatRequest):
        dmt = get_backend().default_max_tokens
        messages = [m.plain() for m in body.messages]
        schema, field = body.schema(), "response_format"
        if schema is None and body.tool_schema() is not None:
            schema, field = body.tool_schema(), "tools"
        jobs = [(0, {"messages": messages, "tools": body.template_tools(), "schema": schema, "schema_field": field,
                     "params": body.params(dmt, j)}) for j in range(body.n)]
        return await _serve(get_backend(), body, jobs, chat=True)

    @app.post("/v1/images/generations")
    async def _images(body: ImageRequest):
        return await serve_images(get_backend(), body)

    @app.post("/v1/classify")
    async def _classify(body: ClassifyRequest):
        return await serve_classify(get_backend(), body)

    return app


async def _serve(backend: Backend, body: _Common, jobs: list[tuple[int, dict]], chat: bool):
    """Run every choice's job at once (they share the engine's batches) and shape the answer."""
    metrics = getattr(backend, "metrics", None)
    refused = wrong_task(backend, body.model, "causal_lm", "/v1/chat/completions" if chat else "/v1/completions")
    if refused is not None:
        return _counted(metrics, "unresolved", refused)
    try:
        target = await backend.call(backend.resolver.resolve, body.model)
    except Exception as exc:  # noqa: BLE001
        return _counted(metrics, "unresolved", from_exception(exc))
    label = target.key or "base"
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    choices = [shape.Choice(i, pi) for i, (pi, _) in enumerate(jobs)]
    streams = [_with_deadline(backend.run(target, {**job, "stream": body.stream}), backend.request_timeout_s)
               for _, job in jobs]
    events = _merge([metrics.observe(s, label) for s in streams] if metrics else streams)
    tools = [t.model_dump() for t in body.tools] if chat and body.tools and body.tool_choice != "none" else None
    want_lps = body.top_logprobs_count() is not None
    if body.stream:
        try:
            first = await events.__anext__()  # errors before the first token still get a proper status
        except StopAsyncIteration:
            first = None
        except Exception as exc:  # noqa: BLE001
            return _counted(metrics, label, from_exception(exc))
        _counted(metrics, label, None)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _Stream(rid, body.model, chat, choices, tools, want_lps)
        return StreamingResponse(stream.sse(first, events, usage), media_type="text/event-stream")
    try:
        async for i, ev in events:
            choices[i].add(ev)
    except Exception as exc:  # noqa: BLE001
        return _counted(metrics, label, from_exception(exc))
    _counted(metrics, label, None)
    return shape.final(rid, body.model, chat, choices, tools, want_lps)


def _counted(metrics, label: str, response: Optional[JSONResponse]):
    """`response` (None: a 200), counted by model and status."""
    if metrics is not None:
        metrics.finished(label, response.status_code if response is not None else 200)
    return response


async def _merge(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, event) from every stream as they come; the first error stops them all."""
    if len(streams) == 1:  # the common case: no tasks, no queue
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for ev in stream:
                queue.put_nowait((i, ev))
            queue.put_nowait((i, done))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is done:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class _Stream:
    """Server-sent events of one response: a chunk per event and choice; with `tools`, a choice's text is held
    until it ends, then sent as a tool call when it is one."""

    def __init__(self, rid: str, model: str, chat: bool, choices: list, tools: Optional[list], want_lps: bool):
        self.rid, self.model, self.chat, self.choices = rid, model, chat, choices
        self.tools, self.want_lps = tools, want_lps
        self.echoed: set[int] = set()  # completions with `echo`: choices whose prompt went out already

    def _chunk(self, ch, ev: dict, before: str) -> Optional[str]:
        reason = ev.get("finish_reason") if ev.get("finished") else None
        entries = ev.get("logprobs") or []
        lps = None
        if self.want_lps and entries:
            lps = shape.chat_logprobs(entries) if self.chat else shape.completion_logprobs(
                entries, len(ch.prompt_text) + len(before))
        if not self.chat:
            text = ev.get("text", "")
            if ch.prompt_text and ch.index not in self.echoed:
                text = ch.prompt_text + text
                self.echoed.add(ch.index)
            return shape.chunk(self.rid, self.model, False, ch.index, {}, reason, lps, text) \
                if text or reason or lps else None
        if self.tools:
            if not ev.get("finished"):
                return None
            text = "".join(ch.text)
            call = shape.tool_call(text, self.tools) if reason == "stop" else None
            if call is not None:
                delta = {"tool_calls": [{"index": 0, **call}]}
                return shape.chunk(self.rid, self.model, True, ch.index, delta, "tool_calls")
            return shape.chunk(self.rid, self.model, True, ch.index, {"content": text}, reason)
        delta = {"content": ev["text"]} if ev.get("text") else {}
        return shape.chunk(self.rid, self.model, True, ch.index, delta, reason, lps) if delta or reason or lps else None

    async def sse(self, first, events, usage: bool):
        try:
            if self.chat:
                for ch in self.choices:
                    yield shape.chunk(self.rid, self.model, True, ch.index, {"role": "assistant", "content": ""})
            pending = [first] if first is not None else []
            while True:
                i, ev = pending.pop() if pending else await events.__anext__()
                ch = self.choices[i]
                before = "".join(ch.text)
                ch.add(ev)
                out = self._chunk(ch, ev, before)
                if out:
                    yield out
        except StopAsyncIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report the error in the stream
            status = int(getattr(exc, "http_status", 500))
            yield f"data: {json.dumps(error_body(status, str(exc), getattr(exc, 'code', None)))}\n\n"
        if usage:
            yield shape.usage_chunk(self.rid, self.model, self.chat, self.choices)
        yield "data: [DONE]\n\n"
