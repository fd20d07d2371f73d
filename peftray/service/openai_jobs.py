"""`/v1/fine_tuning/jobs` of the OpenAI API: create, list, get, cancel, pause, resume, events, checkpoints.

A created job is translated into a peftray job spec (`openai_translate`) and goes through the same admission
as `POST /v1/jobs` (read policy, adapter-name owner, the job store's queue and limits). Pause stops the
running peftray job (as cancel does) and marks the OpenAI job `paused`; resume submits the same spec
again, which is the same run (owner, name, spec fingerprint), so it continues from the run's newest stored
checkpoint (steps after that checkpoint are trained again). Owners see only their own jobs (404 otherwise).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool

from peftray.errors import ConflictError, QuotaError
from peftray.jobspec import load_spec
from peftray.service.admission import admit
from peftray.service.auth import Principal
from peftray.service.openai_checkpoints import list_checkpoints
from peftray.service.openai_files import openai_store, owner_filter
from peftray.service.openai_objects import event_cursor, event_object, job_object, listing
from peftray.service.openai_store import FineTuningRecord, new_job_id
from peftray.service.openai_translate import BodyError, build_spec, parse_create
from peftray.service.runtime import request_cancel, state_of
from peftray.service.store import ACTIVE, CANCELLED, QUEUED, TERMINAL

_METADATA_QUERY = re.compile(r"^metadata\[(.+)\]$")


def _check_active_quota(state: Any, user: str) -> None:
    limit = state.settings.max_active_jobs_per_user
    mine = [j for j in state.store.jobs_in((QUEUED, *ACTIVE)) if j.owner == user]
    if len(mine) >= limit:
        raise QuotaError(f"running jobs quota: you have {len(mine)} jobs queued or running; the limit is {limit} "
                         "per user (PEFTRAY_SERVICE_MAX_ACTIVE_JOBS_PER_USER). Wait for one to finish or cancel one.")


def _submit(state: Any, who: Principal, spec_data: dict[str, Any]):
    """Validate and admit a spec exactly as `POST /v1/jobs` does; returns (stored job, stored spec)."""
    _check_active_quota(state, who.user)
    spec = admit(load_spec(spec_data), who, state.settings, state.store)
    spec_json = spec.model_dump(mode="json")
    job, _ = state.store.create_job(who.user, spec.name, spec_json, None, spec.model_name)
    state.scheduler.wake()
    return job, spec_json


def _create(request: Request, who: Principal, data: Any) -> dict[str, Any]:
    state, store = state_of(request.app), openai_store(request)
    body = parse_create(data)
    files = {}
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id is not None:
            try:
                files[param] = store.get_file(file_id, owner_filter(who))
            except LookupError:
                raise BodyError(f"`{param}`: no file {file_id!r} of yours; upload it with POST /v1/files "
                                "(client.files.create)", param) from None
    job_id = new_job_id()
    spec_data, echo = build_spec(body, job_id, who.user, state.settings.base_models, state.settings.ft_adapter,
                                 files["training_file"], files.get("validation_file"))
    job, spec_json = _submit(state, who, spec_data)
    ft = store.add_job(job_id, who.user, job.id, echo, spec_json)
    return job_object(ft, job)


def _owned(request: Request, who: Principal, job_id: str) -> FineTuningRecord:
    return openai_store(request).get_job(job_id, owner_filter(who))


def _view(request: Request, ft: FineTuningRecord) -> dict[str, Any]:
    return job_object(ft, state_of(request.app).store.get(ft.current_job))


def _pause(request: Request, who: Principal, job_id: str) -> dict[str, Any]:
    ft, state = _owned(request, who, job_id), state_of(request.app)
    job = state.store.get(ft.current_job)
    if ft.paused or job.state in TERMINAL:
        raise ConflictError(f"fine-tuning job {job_id} is {'paused' if ft.paused else job.state}; only a queued or "
                            "running job can be paused")
    openai_store(request).set_paused(ft.id, True)
    request_cancel(state, job.id, who.user)
    return _view(request, _owned(request, who, job_id))


def _resume(request: Request, who: Principal, job_id: str) -> dict[str, Any]:
    ft, state = _owned(request, who, job_id), state_of(request.app)
    if not ft.paused:
        raise ConflictError(f"fine-tuning job {job_id} is not paused; only a paused job can be resumed")
    if state.store.get(ft.current_job).state not in TERMINAL:
        raise ConflictError(f"fine-tuning job {job_id} is still stopping after its pause; resume it once "
                            "GET /v1/fine_tuning/jobs/{id}/events shows it cancelled")
    job, _ = _submit(state, Principal(ft.owner, state.store.user_is_admin(ft.owner)), ft.spec)
    openai_store(request).set_paused(ft.id, False, append_job=job.id)
    return _view(request, _owned(request, who, job_id))


def _cancel(request: Request, who: Principal, job_id: str) -> dict[str, Any]:
    ft, state = _owned(request, who, job_id), state_of(request.app)
    if ft.paused:  # its peftray job already stopped: cancelling ends the pause for good
        openai_store(request).set_paused(ft.id, False)
    elif state.store.get(ft.current_job).state != CANCELLED:
        request_cancel(state, ft.current_job, who.user)
    return _view(request, _owned(request, who, job_id))


def _list(request: Request, who: Principal, after: str | None, limit: int) -> dict[str, Any]:
    wanted = {m.group(1): v for k, v in request.query_params.items() if (m := _METADATA_QUERY.match(k))}
    found, _ = openai_store(request).list_jobs(owner_filter(who), None, 100_000)
    found = [ft for ft in found if all((ft.request.get("metadata") or {}).get(k) == v for k, v in wanted.items())]
    if after:
        ids = [ft.id for ft in found]
        if after not in ids:
            raise BodyError(f"`after`: no fine-tuning job {after!r} of yours", "after")
        found = found[ids.index(after) + 1:]
    return listing([_view(request, ft) for ft in found[:limit]], len(found) > limit)


def _events(request: Request, who: Principal, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
    ft = _owned(request, who, job_id)
    found = openai_store(request).events_of(ft.job_ids, event_cursor(after), limit + 1)
    return listing([event_object(ft.id, ev) for ev in found[:limit]], len(found) > limit)


def install(app: FastAPI, principal: Callable[..., Principal]) -> None:
    """Add the `/v1/fine_tuning/jobs` routes to `app`."""

    @app.post("/v1/fine_tuning/jobs", tags=["openai"])
    async def create_job(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """Create a fine-tuning job (OpenAI's body; `peftray` may set job spec sections, see the README)."""
        try:
            data = await request.json()
        except ValueError:
            raise BodyError("the body must be a JSON object (OpenAI's fine-tuning job fields)") from None
        return await run_in_threadpool(_create, request, who, data)

    @app.get("/v1/fine_tuning/jobs", tags=["openai"])
    def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                  who: Principal = Depends(principal)) -> dict[str, Any]:
        """Your jobs, newest first; `metadata[k]=v` keeps the jobs whose metadata has k = v."""
        return _list(request, who, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}", tags=["openai"])
    def get_job(job_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return _view(request, _owned(request, who, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", tags=["openai"])
    def cancel_job(job_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return _cancel(request, who, job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause", tags=["openai"])
    def pause_job(job_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """Stop the job; it keeps its stored checkpoints. Status `paused`."""
        return _pause(request, who, job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume", tags=["openai"])
    def resume_job(job_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """Continue a paused job from its newest stored checkpoint."""
        return _resume(request, who, job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", tags=["openai"])
    def list_events(job_id: str, request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                    who: Principal = Depends(principal)) -> dict[str, Any]:
        """State changes (`message`) and progress (`metrics`: step, train_loss, valid_loss), newest first."""
        return _events(request, who, job_id, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", tags=["openai"])
    def checkpoints(job_id: str, request: Request, limit: int = Query(10, ge=1, le=100),
                    who: Principal = Depends(principal)) -> dict[str, Any]:
        """The run's stored checkpoints, newest first, each registered (once) as a servable `ft:...` name."""
        ft = _owned(request, who, job_id)
        return listing(list_checkpoints(state_of(request.app).settings.config, ft)[:limit])
