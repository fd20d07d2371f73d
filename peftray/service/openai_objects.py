"""OpenAI's object shapes (file, fine-tuning job, event, checkpoint, list) built from peftray's records.

A fine-tuning job's status follows its newest peftray job: queued -> `queued`, starting or running ->
`running`, then `succeeded`, `failed` or `cancelled`; a paused job is `paused` whatever its stopped peftray
job says. Events are the peftray jobs' own events (state changes -> `message`, progress -> `metrics`),
newest first as OpenAI lists them, with ids `ftevent-<seq>` that serve as the `after` cursor.
"""

from __future__ import annotations

from typing import Any

from peftray.service.openai_store import FileRecord, FineTuningRecord
from peftray.service.store import CANCELLED, FAILED, QUEUED, SUCCEEDED, JobRecord

EVENT_PREFIX = "ftevent-"
_STATUS = {QUEUED: "queued", "starting": "running", "running": "running", SUCCEEDED: "succeeded",
           FAILED: "failed", CANCELLED: "cancelled"}
# progress keys as OpenAI's metrics name them
_METRICS = {"loss": "train_loss", "eval_loss": "valid_loss"}


def listing(data: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more}


def file_object(f: FileRecord) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at), "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None, "expires_at": None}


def status_of(ft: FineTuningRecord, job: JobRecord) -> str:
    return "paused" if ft.paused else _STATUS[job.state]


def job_object(ft: FineTuningRecord, job: JobRecord) -> dict[str, Any]:
    """The `fine_tuning.job` object of `ft`, whose newest peftray job is `job`."""
    req, status = ft.request, status_of(ft, job)
    error = None
    if status == "failed":
        error = {"code": "job_failed", "message": (job.error or job.reason or "training failed")[-2000:],
                 "param": None}
    metrics = job.metrics or {}
    tokens = metrics.get("train_tokens_per_s", 0.0) * metrics.get("train_seconds", 0.0)
    return {
        "id": ft.id, "object": "fine_tuning.job", "created_at": int(ft.created_at), "status": status,
        "finished_at": int(job.finished_at) if job.finished_at and status != "paused" else None,
        "model": req["model"], "organization_id": ft.owner, "training_file": req["training_file"],
        "validation_file": req["validation_file"], "hyperparameters": req["hyperparameters"],
        "method": req["method"], "seed": req["seed"], "metadata": req["metadata"], "result_files": [],
        "fine_tuned_model": req["fine_tuned_model"] if status == "succeeded" else None,
        "trained_tokens": int(tokens) if status == "succeeded" and tokens else None,
        "error": error, "estimated_finish": _estimated_finish(job) if status == "running" else None,
        "integrations": [], "user_provided_suffix": req["suffix"],
        "peftray_job_ids": list(ft.job_ids),  # the peftray jobs behind it (their logs: GET /v1/jobs/{id}/logs)
    }


def _estimated_finish(job: JobRecord) -> int | None:
    """Now + the remaining steps at the pace so far (from the job's running time and its newest progress)."""
    p = job.progress or {}
    step, total = p.get("step"), p.get("total_steps")
    if not job.running_at or not isinstance(step, int) or not isinstance(total, int) or step <= 0:
        return None
    pace = (job.updated_at - job.running_at) / step
    return int(job.updated_at + pace * max(0, total - step))


def event_object(ft_id: str, ev: dict[str, Any]) -> dict[str, Any]:
    """One `fine_tuning.job.event` from a stored peftray event (kind state | progress | result)."""
    data: dict[str, Any] = {}
    kind, level = "message", "info"
    if ev["kind"] == "progress":
        kind = "metrics"
        p = ev.get("data") or {}
        data = {_METRICS.get(k, k): v for k, v in p.items() if k != "job"}
        message = f"Step {p.get('step')}/{p.get('total_steps')}: training loss={p.get('loss')}"
    elif ev["kind"] == "result":
        r = ev.get("data") or {}
        data = {"model_name": r.get("model_name"), "version": r.get("version")}
        message = f"Registered the adapter as {r.get('model_name')}/{r.get('version')}"
    else:
        level = "error" if ev.get("state") == FAILED else "info"
        message = f"Job {ev.get('state')}: {ev.get('reason') or ''}".rstrip(": ")
        data = {"state": ev.get("state")}
    return {"id": f"{EVENT_PREFIX}{ev['seq']}", "object": "fine_tuning.job.event", "created_at": int(ev["at"]),
            "level": level, "message": message, "data": data, "type": kind, "fine_tuning_job_id": ft_id}


def event_cursor(after: str | None) -> int | None:
    """The seq an `after` event id names (None: from the newest)."""
    if not after:
        return None
    digits = after.removeprefix(EVENT_PREFIX)
    if not digits.isdigit():
        from peftray.service.openai_translate import BodyError

        raise BodyError(f"`after` must be an event id like {EVENT_PREFIX}12, got {after!r}", "after")
    return int(digits)


def checkpoint_object(ft_id: str, step: int, created_at: float, metrics: dict[str, Any],
                      name: str) -> dict[str, Any]:
    shown = {_METRICS.get(k, k): v for k, v in metrics.items() if isinstance(v, (int, float))}
    shown["step"] = step
    return {"id": f"ftckpt-{ft_id.removeprefix('ftjob-')}-{step}", "object": "fine_tuning.job.checkpoint",
            "created_at": int(created_at), "fine_tuned_model_checkpoint": name, "fine_tuning_job_id": ft_id,
            "metrics": shown, "step_number": step}
