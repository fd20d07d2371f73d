"""The control plane's REST API (FastAPI): jobs, their events and logs, adapters, tokens.

`create_app(settings)` builds the app; the job store, the Ray executor and the scheduler thread live on
`app.state` and start with the app. Every error is JSON in OpenAI's error shape:
`{"error": {"code": ..., "message": ..., "type": ..., "param": ...}}` (`param`: the field at fault, or null).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftray.errors import NotFoundError, PeftrayError
from peftray.service import adapters_api, openai_files, openai_jobs
from peftray.service.admission import admit
from peftray.service.auth import Principal, authenticate, issue_token
from peftray.service.executor import RayExecutor
from peftray.service.intake import read_body, validate_spec
from peftray.service.runtime import request_cancel, start_state, state_of, stop_state
from peftray.service.settings import ServiceSettings
from peftray.service.store import JobRecord, JobStore

NDJSON = "application/x-ndjson"
JobState = Literal["queued", "starting", "running", "succeeded", "failed", "cancelled"]
FOLLOW_POLL_S = 0.5
KEEPALIVE_S = 15.0


# OpenAI's error `type` by HTTP status (its clients map the status to an exception class anyway)
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}


def error_body(code: str, message: str, status: int = 400, param: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"code": code, "message": message, "type": kind, "param": param}}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PeftrayError)
    async def _peftray(_request: Request, exc: PeftrayError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
        body = error_body(exc.code, str(exc), exc.http_status, getattr(exc, "param", None))
        return JSONResponse(body, status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        fields = [".".join(str(p) for p in e["loc"] if p != "body") for e in exc.errors()]
        problems = "; ".join(f"`{f}`: {e['msg']}" for f, e in zip(fields, exc.errors()))
        return JSONResponse(error_body("invalid_request", problems, 422, fields[0] if fields else None),
                            status_code=422)

    @app.exception_handler(RecursionError)
    async def _too_deep(_request: Request, _exc: RecursionError):  # a body nested thousands of levels deep
        return JSONResponse(error_body("invalid_request", "request body is nested too deeply; send the fields "
                                       "as documented"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body("http_error", str(exc.detail), exc.status_code), status_code=exc.status_code)


class BodyLimit:
    """ASGI middleware: refuse (413) any request whose Content-Length exceeds the limit, before reading it.

    `POST /v1/jobs` and `POST /v1/files` also count the bytes of bodies sent without a length (see
    `intake.read_body`). File uploads (`POST /v1/files`) have their own, larger limit.
    """

    def __init__(self, app, limit: int, file_limit: int):
        self.app, self.limit, self.file_limit = app, limit, file_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            limit = self.file_limit if scope.get("path") == "/v1/files" else self.limit
            if length.isdigit() and int(length) > limit:
                body = error_body("body_too_large", f"request body is {int(length)} bytes; the limit is "
                                  f"{limit} bytes. Reference datasets and models by path or URI instead.", 413)
                return await JSONResponse(body, status_code=413)(scope, receive, send)
        return await self.app(scope, receive, send)


def principal(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller (401 otherwise)."""
    state = state_of(request.app)
    return authenticate(request.headers.get("authorization"), state.store, state.settings.admin_token)


def _owned_job(request: Request, job_id: str, who: Principal) -> JobRecord:
    job = state_of(request.app).store.get(job_id, with_transitions=True)
    who.check_owns(job)
    return job


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    user: str = Field(description="user name the token acts as")
    admin: bool = Field(False, description="give the token admin rights")
    ttl_s: float | None = Field(None, gt=0, description="seconds until the token expires; none = never")


def create_app(settings: ServiceSettings | None = None, manage_state: bool = True) -> FastAPI:
    """The FastAPI app of the control plane (settings default to `ServiceSettings.from_env()`).

    With `manage_state` the app's lifespan runs `start_state`/`stop_state`; a host that manages the lifetime
    itself (a Ray Serve replica, `peftray.service.serve_app`) passes False: the first request starts them.
    """
    settings = settings or ServiceSettings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        start_state(app, settings)
        try:
            yield
        finally:
            stop_state(app)

    app = FastAPI(title="peftray control plane", version="1", lifespan=lifespan if manage_state else None,
                  description="Submit, track, cancel and promote parameter-efficient fine-tuning jobs on Ray.")
    app.state.settings = settings  # without manage_state, the first request starts the rest (`state_of`)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, file_limit=settings.max_file_bytes)
    _job_routes(app)
    _stream_routes(app)
    adapters_api.install(app, principal)
    openai_files.install(app, principal)
    openai_jobs.install(app, principal)

    @app.get("/healthz", tags=["service"])
    def healthz(request: Request) -> dict[str, Any]:
        state_of(request.app)  # a Serve replica's first health probe opens the store and starts the scheduler
        return {"ok": True}

    @app.get("/v1/whoami", tags=["service"])
    def whoami(who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"user": who.user, "is_admin": who.is_admin}

    _token_routes(app)
    return app


def _token_routes(app: FastAPI) -> None:
    @app.post("/v1/tokens", status_code=201, tags=["service"])
    def create_token(body: TokenRequest, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """Issue an API token for a user (admin only). The token is shown once; only its sha256 is stored."""
        who.check_admin("issuing tokens")
        return issue_token(state_of(request.app).store, body.user, body.admin, body.ttl_s)

    @app.get("/v1/tokens", tags=["service"])
    def list_tokens(request: Request, user: str | None = None,
                    who: Principal = Depends(principal)) -> dict[str, Any]:
        """Tokens (id, user, expiry, revocation; never the token): a user sees their own, the admin everyone's."""
        if not who.is_admin:
            user = who.user
        return {"tokens": state_of(request.app).store.list_tokens(user=user)}

    @app.delete("/v1/tokens/{token_id}", tags=["service"])
    def revoke_token(token_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """Revoke a token: requests with it get 401 from now on. A user may revoke their own tokens."""
        store = state_of(request.app).store
        found = store.list_tokens(token_id=token_id)
        if not found or (not who.is_admin and found[0]["user"] != who.user):
            raise NotFoundError(f"no token {token_id!r} of yours; list them with `peftray service tokens`")
        store.revoke_token(token_id)
        return store.list_tokens(token_id=token_id)[0]


def _job_routes(app: FastAPI) -> None:
    @app.post("/v1/jobs", tags=["jobs"], status_code=201)
    async def submit_job(request: Request, dry_run: bool = False, refuse_changed_spec: bool = False,
                         who: Principal = Depends(principal)) -> JSONResponse:
        """Submit a job spec (JSON, or YAML with any other content type).

        Send an `Idempotency-Key` header to make retries safe: the same key (per user) returns the job the
        first request created (200) instead of making another (201). `?dry_run=true` only validates.
        `?refuse_changed_spec=true` refuses (409) a name you used before for a different spec; without it, a
        changed spec under the same name is a new run (its own checkpoints and MLflow run).
        """
        state = state_of(request.app)
        body = await read_body(request.stream(), request.headers.get("content-length"), state.settings.max_body_bytes)
        spec = validate_spec(body, request.headers.get("content-type"))
        spec = await run_in_threadpool(admit, spec, who, state.settings, state.store, refuse_changed_spec)
        spec_json = spec.model_dump(mode="json")
        if dry_run:
            return JSONResponse({"valid": True, "spec": spec_json}, status_code=200)
        key = request.headers.get("idempotency-key") or None
        if key is not None and not (0 < len(key) <= 200):
            from peftray.errors import ConfigError

            raise ConfigError(f"Idempotency-Key must be 1 to 200 characters, got {len(key)}")
        job, created = await run_in_threadpool(state.store.create_job, who.user, spec.name, spec_json, key,
                                                   spec.model_name)
        state.scheduler.wake()
        return JSONResponse(job.to_api(), status_code=201 if created else 200)

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(request: Request, state: JobState | None = None, name: str | None = None,
                  owner: str | None = None, limit: int = Query(50, ge=1, le=500), cursor: int | None = None,
                  who: Principal = Depends(principal)) -> dict[str, Any]:
        """Jobs newest first; a user sees their own, the admin everyone's (or one `owner`'s)."""
        if not who.is_admin:
            owner = who.user
        store = state_of(request.app).store
        jobs, nxt = store.list_jobs(owner=owner, state=state, name=name, limit=limit, before=cursor)
        return {"jobs": [j.to_api() for j in jobs], "next_cursor": nxt}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """State, timestamps, transitions, spec, Ray job id, MLflow run id, registered version, error."""
        return _owned_job(request, job_id, who).to_api()

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], status_code=202)
    def cancel_job(job_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """Cancel a job: a queued one at once; a started one by stopping its Ray job (and so its workers)."""
        job = _owned_job(request, job_id, who)
        return request_cancel(state_of(request.app), job.id, who.user).to_api()


def _stream_routes(app: FastAPI) -> None:
    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    def job_events(job_id: str, request: Request, follow: bool = False, after: int = 0,
                   who: Principal = Depends(principal)) -> StreamingResponse:
        """State changes, progress and the result as NDJSON; `follow=true` streams until the job ends."""
        _owned_job(request, job_id, who)
        return StreamingResponse(_events(state_of(request.app).store, job_id, follow, after), media_type=NDJSON)

    @app.get("/v1/jobs/{job_id}/logs", tags=["jobs"])
    def job_logs(job_id: str, request: Request, follow: bool = False,
                 who: Principal = Depends(principal)) -> StreamingResponse:
        """The job's output (driver and workers) as text; `follow=true` streams until the job ends."""
        _owned_job(request, job_id, who)
        state = state_of(request.app)
        return StreamingResponse(_logs(state.store, state.executor, job_id, follow), media_type="text/plain")


async def _events(store: JobStore, job_id: str, follow: bool, after: int) -> AsyncIterator[str]:
    quiet = 0.0
    while True:
        ended = (await run_in_threadpool(store.get, job_id)).terminal  # read before the events: none are missed
        batch = await run_in_threadpool(store.events_after, job_id, after)
        for ev in batch:
            after = ev["seq"]
            yield json.dumps(ev) + "\n"
        if batch:
            quiet = 0.0
            continue
        if not follow or ended:
            return
        await asyncio.sleep(FOLLOW_POLL_S)
        quiet += FOLLOW_POLL_S
        if quiet >= KEEPALIVE_S:  # a blank line lets clients and proxies see the stream is alive
            quiet = 0.0
            yield "\n"


async def _logs(store: JobStore, executor: RayExecutor, job_id: str, follow: bool) -> AsyncIterator[str]:
    offset = 0
    while True:
        job = await run_in_threadpool(store.get, job_id)
        if job.ray_job_id:
            text = await run_in_threadpool(executor.logs, job.ray_job_id)
            if len(text) > offset:
                yield text[offset:]
                offset = len(text)
        if not follow or job.terminal:
            return
        await asyncio.sleep(FOLLOW_POLL_S * 2)
