"""A small HTTP client of the control plane (httpx): what the CLI, the benchmark and the tests use.

Errors come back as peftray exceptions carrying the server's message: 401 `AuthError`, 403 `ForbiddenError`,
404 `NotFoundError`, 409 `ConflictError`, other 4xx `ConfigError`, 5xx `PeftrayError`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator

import httpx

from peftray.endpoints import Config, load_config
from peftray.errors import (AuthError, ConfigError, ConflictError, ForbiddenError, NotFoundError, PeftrayError)

_BY_STATUS = {401: AuthError, 403: ForbiddenError, 404: NotFoundError, 409: ConflictError}
TERMINAL = ("succeeded", "failed", "cancelled")


class ServiceClient:
    """Talks to one control plane at `url` with one bearer `token`."""

    SAFE_RETRIES = 3

    def __init__(self, url: str, token: str | None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @classmethod
    def from_config(cls, config: Config | None = None) -> "ServiceClient":
        """The client for PEFTRAY_SERVICE_URL / PEFTRAY_TOKEN (or the local stack's running service)."""
        cfg = config or load_config()
        if not cfg.service_url:
            raise ConfigError("no control plane to talk to: set PEFTRAY_SERVICE_URL (and PEFTRAY_TOKEN), "
                              "or start the local one with `peftray service up`")
        return cls(cfg.service_url, cfg.service_token)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- plumbing -------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call. A read, or a write that carries an Idempotency-Key, is sent again (up to
        SAFE_RETRIES times) when it timed out or its connection was dropped mid-request (a busy service; a kept-alive
        connection the server closed as it was reused): the service answers a repeat as the first. A refused
        connection is not retried: nothing is listening."""
        headers = kwargs.get("headers") or {}
        safe = method == "GET" or "Idempotency-Key" in headers
        for attempt in range(self.SAFE_RETRIES + 1 if safe else 1):
            try:
                resp = self.http.request(method, path, **kwargs)
                break
            except httpx.TransportError as exc:
                again = safe and isinstance(exc, (httpx.TimeoutException, httpx.ReadError, httpx.WriteError,
                                                  httpx.RemoteProtocolError))
                if not again or attempt == self.SAFE_RETRIES:
                    raise PeftrayError(f"cannot reach the control plane at {self.url}: {exc}. Is it running "
                                       "(`peftray service status`)?") from None
                time.sleep(min(2.0 ** attempt, 8.0))
        _raise_for(resp)
        return resp.json()

    def _stream(self, path: str, params: dict[str, Any]) -> Iterator[str]:
        try:
            with self.http.stream("GET", path, params=params, timeout=httpx.Timeout(30.0, read=None)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for(resp)
                yield from resp.iter_lines() if path.endswith("/events") else resp.iter_text()
        except httpx.TransportError as exc:
            raise PeftrayError(f"lost the stream from {self.url}{path}: {exc}") from None

    # ---- jobs -----------------------------------------------------------------------------------------------
    def submit(self, spec: dict[str, Any] | str, idempotency_key: str | None = None,
               dry_run: bool = False, refuse_changed_spec: bool = False) -> dict[str, Any]:
        """Submit a spec (a mapping, sent as JSON, or YAML text). A key (default: a fresh one) makes retries safe;
        `refuse_changed_spec` refuses (409) a name this user ran before with a different spec."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        if isinstance(spec, str):
            headers["Content-Type"] = "application/yaml"
            kwargs: dict[str, Any] = {"content": spec.encode()}
        else:
            kwargs = {"json": spec}
        params = {k: "true" for k, on in (("dry_run", dry_run), ("refuse_changed_spec", refuse_changed_spec)) if on}
        return self.request("POST", "/v1/jobs", params=params or None, headers=headers, **kwargs)

    def get(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def list(self, state: str | None = None, name: str | None = None, limit: int = 50,
             cursor: int | None = None) -> dict[str, Any]:
        params = {k: v for k, v in dict(state=state, name=name, limit=limit, cursor=cursor).items() if v is not None}
        return self.request("GET", "/v1/jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, follow: bool = False, after: int = 0) -> Iterator[dict[str, Any]]:
        """State changes, progress and result events; with `follow`, until the job ends."""
        for line in self._stream(f"/v1/jobs/{job_id}/events", {"follow": follow, "after": after}):
            if line.strip():
                yield json.loads(line)

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        """Chunks of the job's output; with `follow`, until the job ends."""
        yield from self._stream(f"/v1/jobs/{job_id}/logs", {"follow": follow})

    def wait(self, job_id: str, timeout: float = 600, interval: float = 0.5) -> dict[str, Any]:
        """Poll until the job ends; returns its record. Raises PeftrayError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["state"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise PeftrayError(f"job {job_id} still {job['state']} after {timeout:.0f}s")
            time.sleep(interval)

    # ---- adapters and tokens --------------------------------------------------------------------------------
    def promote(self, name: str, version: int, alias: str, reason: str | None = None,
                gate: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"version": int(version), "alias": alias, "reason": reason, "gate": gate}
        return self.request("POST", f"/v1/adapters/{name}/promote", json=body)

    def rollback(self, name: str, alias: str, reason: str | None = None) -> dict[str, Any]:
        return self.request("POST", f"/v1/adapters/{name}/rollback", json={"alias": alias, "reason": reason})

    def create_token(self, user: str, admin: bool = False, ttl_s: float | None = None) -> str:
        """A new token for `user` (admin only); `ttl_s` seconds until it expires (None: never)."""
        return self.issue_token(user, admin, ttl_s)["token"]

    def issue_token(self, user: str, admin: bool = False, ttl_s: float | None = None) -> dict[str, Any]:
        """Like `create_token`, returning the whole record: token, id, user, expires_at."""
        return self.request("POST", "/v1/tokens", json={"user": user, "admin": admin, "ttl_s": ttl_s})

    def list_tokens(self, user: str | None = None) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/tokens", params={"user": user} if user else None)["tokens"]

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/tokens/{token_id}")


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        message = err["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:500] or resp.reason_phrase
    cls = _BY_STATUS.get(resp.status_code) or (ConfigError if resp.status_code < 500 else PeftrayError)
    raise cls(f"{message} (HTTP {resp.status_code})")
