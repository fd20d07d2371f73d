"""OpenAI's error object for the errors Ray Serve's HTTP proxy makes itself (issue 14, item 12).

When the ingress replica dies under a request, or Serve times a request out or sheds it, the proxy answers
on its own: a bare `500 Internal Server Error` (or a plain-text 408/429/503), which OpenAI clients cannot
read. This ASGI middleware runs in the proxy (Serve loads it from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`,
set by `peftray.serve.lifecycle` when it starts Serve) and turns those into `{"error": {...}}` JSON with
`Retry-After`: a dead or restarting replica is 503 (retry), not 500. JSON responses of the app pass untouched.
"""

from __future__ import annotations

import json

CALLBACK = "peftray.serve.proxy_errors:middlewares"
_RETRYABLE = {500: 503, 502: 503, 503: 503, 504: 503, 408: 408, 429: 429}


def middlewares() -> list:
    """What Serve's proxy callback returns: the Starlette middlewares to wrap its ASGI app in."""
    from starlette.middleware import Middleware

    from peftray.serve.proxy_gate import AdmissionGate

    return [Middleware(OpenAIProxyErrors), Middleware(AdmissionGate)]  # the last wraps outermost: gate first


def _error(status: int, text: str) -> tuple[dict, bytes]:
    kind = "rate_limit_exceeded" if status == 429 else "server_error" if status >= 500 else "timeout"
    msg = {503: "the serving replica is unavailable (it died or is restarting); retry the request in a moment.",
           408: "the request timed out in the Serve proxy; retry it, or ask for fewer max_tokens.",
           429: "the server is overloaded; retry after a moment."}.get(status, "the request failed; retry it.")
    if text:
        msg += f" ({text.strip()[:300]})"
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]}
    body = json.dumps({"error": {"message": msg, "type": kind, "param": None, "code": f"http_{status}"}}).encode()
    return start, body


class OpenAIProxyErrors:
    """ASGI middleware: non-JSON error responses (and no response at all) become OpenAI error objects."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "held": None, "body": b""}

        async def forward(message) -> None:
            if message["type"] == "http.response.start" and not state["started"]:
                headers = {k.lower(): v for k, v in message.get("headers") or []}
                plain = b"json" not in headers.get(b"content-type", b"") and b"event-stream" not in headers.get(
                    b"content-type", b"")
                if message["status"] in _RETRYABLE and plain:
                    state["held"] = message  # the proxy's own error: rewrite once its body is complete
                    return
                state["started"] = True
            elif message["type"] == "http.response.body" and state["held"] is not None:
                state["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    await self._send_error(send, state, _RETRYABLE[state["held"]["status"]])
                return
            await send(message)

        try:
            await self.app(scope, receive, forward)
        except Exception:  # noqa: BLE001 - the proxy failed before answering: the client still gets JSON
            if not state["started"]:
                await self._send_error(send, state, 503)
            return
        if not state["started"]:
            await self._send_error(send, state, _RETRYABLE.get((state["held"] or {}).get("status", 500), 503))

    @staticmethod
    async def _send_error(send, state: dict, status: int) -> None:
        if state["started"]:
            return
        state["started"] = True
        start, body = _error(status, state["body"].decode("utf-8", "replace"))
        await send(start)
        await send({"type": "http.response.body", "body": body})
