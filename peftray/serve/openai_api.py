"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, errors, SSE streaming.

The routes are thin: check the key, validate the body (pydantic, unknown fields refused), resolve `model`,
hand the job to the backend (the Serve ingress sends it to an engine replica) and shape its events into
OpenAI's JSON or server-sent events ending with `data: [DONE]`. Every error is OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`) with the matching status and, for 429/503, `Retry-After`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator, Literal, Optional, Protocol, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from peftray.errors import PeftrayError
from peftray.serve.watch import ModelResolver, Target


class RequestTimeout(PeftrayError):
    code = "timeout"
    http_status = 504


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    logprobs: Optional[Union[bool, int]] = None

    @model_validator(mode="after")
    def _stops(self):
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ValueError(f"stop may hold at most 4 sequences, got {len(stops)}")
        if self.logprobs:
            raise ValueError("logprobs are not supported by this server; leave logprobs unset")
        return self

    def params(self, default_max_tokens: int) -> dict[str, Any]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {"max_tokens": self.max_tokens or default_max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "stop": [s for s in stops if s], "seed": self.seed}


class CompletionRequest(_Common):
    prompt: Union[str, list[int]] = Field(..., description="text, or token ids")
    echo: bool = Field(False, description="must be false")

    @model_validator(mode="after")
    def _no_echo(self):
        if self.echo:
            raise ValueError("echo is not supported; leave it false")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]]]
    name: Optional[str] = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def params(self, default_max_tokens: int) -> dict[str, Any]:
        out = super().params(default_max_tokens)
        out["max_tokens"] = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return out

    def plain_messages(self) -> list[dict[str, str]]:
        def text(c) -> str:
            return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if p.get("type") == "text")

        return [{"role": "system" if m.role == "developer" else m.role, "content": text(m.content)}
                for m in self.messages]


class Backend(Protocol):
    """What the routes need: a resolver and a way to run a job (an async stream of event dicts)."""

    resolver: ModelResolver
    api_key: Optional[str]
    default_max_tokens: int
    request_timeout_s: float

    def run(self, target: Target, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def call(self, fn, *args): ...


# --- errors --------------------------------------------------------------------------------------------
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          429: "rate_limit_exceeded", 503: "server_error", 504: "server_error"}


def error_body(status: int, message: str, code: Optional[str] = None, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                   retry_after: Optional[float] = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, int(retry_after or 1)))} if status in (429, 503) else None
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def from_exception(exc: BaseException) -> JSONResponse:
    status = int(getattr(exc, "http_status", 500))
    code = getattr(exc, "code", None)
    if status == 404 and code == "not_found":
        code = "model_not_found"
    return error_response(status, str(exc) if status < 500 or isinstance(exc, PeftrayError)
                          else f"internal error: {type(exc).__name__}", code, retry_after=getattr(exc, "retry_after_s",
                                                                                                   None))


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

    @app.post("/v1/completions")
    async def _completions(body: CompletionRequest):
        job = {"prompt": body.prompt, "params": body.params(get_backend().default_max_tokens)}
        return await _serve(get_backend(), body, job, chat=False)

    @app.post("/v1/chat/completions")
    async def _chat(body: ChatRequest):
        job = {"messages": body.plain_messages(), "params": body.params(get_backend().default_max_tokens)}
        return await _serve(get_backend(), body, job, chat=True)

    return app


async def _serve(backend: Backend, body: _Common, job: dict, chat: bool):
    try:
        target = await backend.call(backend.resolver.resolve, body.model)
    except Exception as exc:  # noqa: BLE001
        return from_exception(exc)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    events = _with_deadline(backend.run(target, job), backend.request_timeout_s)
    if body.stream:
        try:
            first = await events.__anext__()  # errors before the first token still get a proper status
        except StopAsyncIteration:
            first = None
        except Exception as exc:  # noqa: BLE001
            return from_exception(exc)
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(rid, body.model, chat, first, events, usage), media_type="text/event-stream")
    text, last = [], {}
    try:
        async for ev in events:
            text.append(ev.get("text", ""))
            last = ev
    except Exception as exc:  # noqa: BLE001
        return from_exception(exc)
    return _final(rid, body.model, chat, "".join(text), last)


async def _with_deadline(events: AsyncIterator[dict], timeout_s: float) -> AsyncIterator[dict]:
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError
            try:
                ev = await asyncio.wait_for(events.__anext__(), left)
            except StopAsyncIteration:
                return
            if ev.get("error"):
                err = ev["error"]
                raise _RemoteError(err.get("status", 500), err.get("message", "error"), err.get("code"))
            yield ev
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request ran longer than request_timeout_s={timeout_s:g} s and was stopped; "
                             "ask for fewer max_tokens or raise request_timeout_s in serve.yaml.") from None
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:  # noqa: BLE001 - closing a finished stream
                pass


class _RemoteError(PeftrayError):
    def __init__(self, status: int, message: str, code: Optional[str]) -> None:
        super().__init__(message)
        self.http_status, self.code = status, code or "error"
        self.retry_after_s = 1 if status in (429, 503) else None


def _usage(ev: dict) -> dict:
    p, c = int(ev.get("prompt_tokens", 0)), int(ev.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _final(rid: str, model: str, chat: bool, text: str, last: dict) -> dict:
    reason = last.get("finish_reason") or "stop"
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _usage(last)}


def _chunk(rid: str, model: str, chat: bool, text: Optional[str], reason: Optional[str], role: bool = False) -> str:
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [choice]}
    return f"data: {json.dumps(obj)}\n\n"


async def _sse(rid: str, model: str, chat: bool, first: Optional[dict], events, usage: bool):
    last: dict = first or {}
    try:
        if chat:
            yield _chunk(rid, model, chat, None, None, role=True)
        pending = [first] if first is not None else []
        while True:
            ev = pending.pop() if pending else await events.__anext__()
            last = ev
            if ev.get("text") or ev.get("finished"):
                yield _chunk(rid, model, chat, ev.get("text"), ev.get("finish_reason") if ev.get("finished") else None)
    except StopAsyncIteration:
        pass
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report the error in the stream
        status = int(getattr(exc, "http_status", 500))
        yield f"data: {json.dumps(error_body(status, str(exc), getattr(exc, 'code', None)))}\n\n"
    if usage:
        obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
               "created": int(time.time()), "model": model, "choices": [], "usage": _usage(last)}
        yield f"data: {json.dumps(obj)}\n\n"
    yield "data: [DONE]\n\n"
