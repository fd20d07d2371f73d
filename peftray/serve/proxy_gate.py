"""Admission in Serve's HTTP proxy: a request beyond an application's capacity is refused there, at once.

Under a burst of hundreds of requests the ingress replica's exact count (OpenAIIngress.run) decides only after
the request crossed the proxy -> router -> replica hops, which on a busy 2-core machine took seconds (issue 14,
item 13). The proxy runs this middleware (loaded with `proxy_errors.middlewares`), counts the generation
requests in flight per application and answers the one past `capacity` with OpenAI's 429 and Retry-After
without any hop. The capacity is published by `deploy` in Ray's internal KV; an application without one (e.g.
started by `serve run`) is not gated here, and the ingress's count stays the exact limit behind it.
"""

from __future__ import annotations

import json
import time
from typing import Optional

NAMESPACE = "peftray"
_ROUTES = ("/v1/completions", "/v1/chat/completions")
_REFRESH_S = 5.0


def capacity_key(app: str) -> str:
    return f"serve-capacity/{app}"


def publish(app: str, capacity: Optional[int]) -> None:
    """Record (or with None, forget) `app`'s capacity for the proxies; called from a Ray driver."""
    from ray.experimental import internal_kv

    if capacity is None:
        internal_kv._internal_kv_del(capacity_key(app), namespace=NAMESPACE)
    else:
        internal_kv._internal_kv_put(capacity_key(app), str(int(capacity)), overwrite=True, namespace=NAMESPACE)


def _lookup(app: str) -> Optional[int]:
    try:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(capacity_key(app), namespace=NAMESPACE)
        return int(raw) if raw else None
    except Exception:  # noqa: BLE001 - no Ray here (tests of the middleware) or GCS busy: do not gate
        return None


class AdmissionGate:
    """ASGI middleware: at most `capacity` generation requests of an application in flight in this proxy."""

    def __init__(self, app, lookup=_lookup) -> None:
        self.app, self.lookup = app, lookup
        self.inflight: dict[str, int] = {}
        self._capacity: dict[str, tuple[Optional[int], float]] = {}

    def capacity(self, app: str) -> Optional[int]:
        known = self._capacity.get(app)
        if known is None or time.monotonic() - known[1] > _REFRESH_S:
            known = (self.lookup(app), time.monotonic())
            self._capacity[app] = known
        return known[0]

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        app = path.strip("/").split("/", 1)[0]
        if scope.get("type") != "http" or scope.get("method") != "POST" or not path.endswith(_ROUTES):
            return await self.app(scope, receive, send)
        limit = self.capacity(app)
        if limit is not None and self.inflight.get(app, 0) >= limit:
            return await _refuse(send, self.inflight[app], limit)
        self.inflight[app] = self.inflight.get(app, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight[app] -= 1


async def _refuse(send, inflight: int, limit: int) -> None:
    msg = (f"every engine replica is busy and its queue is full ({inflight} requests in flight, capacity {limit}: "
           "replicas x max_ongoing_requests + max_queued_requests); retry after a moment.")
    body = json.dumps({"error": {"message": msg, "type": "rate_limit_exceeded", "param": None,
                                 "code": "rate_limit_exceeded"}}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})
