"""OpenAI's error object for the serving routes, and the deadline every request runs under.

Every error is `{"error": {"message", "type", "param", "code"}}` with the matching status and, for 429/503,
`Retry-After`; `param` names the request field at fault where one is (an exception's own `param`).
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Optional

from fastapi.responses import JSONResponse

from peftray.errors import PeftrayError


class RequestTimeout(PeftrayError):
    code = "timeout"
    http_status = 504


# --- errors --------------------------------------------------------------------------------------------
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          429: "rate_limit_exceeded", 503: "server_error", 504: "server_error"}


def error_body(status: int, message: str, code: Optional[str] = None, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                   retry_after: Optional[float] = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, int(retry_after or 1)))} if status in (429, 503) else None
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def from_exception(exc: BaseException, param: Optional[str] = None) -> JSONResponse:
    """OpenAI's error for `exc`; `param` names the request field when the exception does not (its `param`)."""
    status = int(getattr(exc, "http_status", 500))
    code = getattr(exc, "code", None)
    if status == 404 and code == "not_found":
        code = "model_not_found"
    return error_response(status, str(exc) if status < 500 or isinstance(exc, PeftrayError)
                          else f"internal error: {type(exc).__name__}", code, getattr(exc, "param", None) or param,
                          retry_after=getattr(exc, "retry_after_s", None))


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
                raise _RemoteError(err.get("status", 500), err.get("message", "error"), err.get("code"),
                                   err.get("param"))
            yield ev
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request ran longer than request_timeout_s={timeout_s:g} s and was stopped; "
                             "ask for less (max_tokens; for images n or num_inference_steps) or raise "
                             "request_timeout_s in serve.yaml.") from None
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:  # noqa: BLE001 - closing a finished stream
                pass


class _RemoteError(PeftrayError):
    def __init__(self, status: int, message: str, code: Optional[str], param: Optional[str] = None) -> None:
        super().__init__(message)
        self.http_status, self.code, self.param = status, code or "error", param
        self.retry_after_s = 1 if status in (429, 503) else None


def wrong_task(backend, model: str, want: str | tuple[str, ...], route: str) -> Optional[JSONResponse]:
    """A 400 naming `model` when this deployment's task is not (one of) those `route` needs."""
    spec = backend.resolver.spec
    wanted = (want,) if isinstance(want, str) else tuple(want)
    if spec.task in wanted:
        return None
    need = " or ".join(wanted)
    return error_response(400, f"`model` {model!r}: this deployment serves {spec.served_model_id!r} for {spec.task}; "
                               f"{route} needs a {need} deployment (task: {wanted[0]} in its serve spec).",
                          "model_not_supported", "model")


def counted(backend, label: str, response: Optional[JSONResponse]):
    """`response` (None: a 200), counted in the backend's metrics by model and status."""
    metrics = getattr(backend, "metrics", None)
    if metrics is not None:
        metrics.finished(label, response.status_code if response is not None else 200)
    return response


async def one_answer(backend, model: str, tasks: str | tuple[str, ...], route: str, job: dict):
    """Run a single-answer job (images, classification) for `model`: (model label, the engine's last event), or
    the OpenAI error (a JSONResponse) when the task is wrong, `model` does not resolve or the job fails. Either
    way the request is counted, and the engine's counters that ride on its answer reach the metrics."""
    refused = wrong_task(backend, model, tasks, route)
    if refused is not None:
        return counted(backend, "unresolved", refused)
    try:
        target = await backend.call(backend.resolver.resolve, model)
    except Exception as exc:  # noqa: BLE001
        return counted(backend, "unresolved", from_exception(exc, param="model"))
    label = target.key or "base"
    last: dict = {}
    try:
        async for ev in _with_deadline(backend.run(target, job), backend.request_timeout_s):
            last = ev
    except Exception as exc:  # noqa: BLE001
        return counted(backend, label, from_exception(exc))
    metrics = getattr(backend, "metrics", None)
    if metrics is not None and last.get("engine"):
        metrics.engine_stats(last["engine"])
    counted(backend, label, None)
    return label, last
