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


def wrong_task(backend, model: str, want: str, route: str) -> Optional[JSONResponse]:
    """A 400 naming `model` when this deployment's task is not the one `route` needs."""
    spec = backend.resolver.spec
    if spec.task == want:
        return None
    return error_response(400, f"`model` {model!r}: this deployment serves {spec.served_model_id!r} for {spec.task}; "
                               f"{route} needs a {want} deployment (task: {want} in its serve spec).",
                          "model_not_supported", "model")
