"""The scheduler loop: admits queued jobs within the concurrency limits and reconciles active ones with Ray.

Ray is the truth about a job that has started: each pass asks Ray for the status of every `starting` or
`running` job and moves the record along. The same pass run by a freshly started service is the restart
reconcile: nothing lives only in memory. Progress comes from the lines the trainer prints,

    PEFTRAY_PROGRESS {"step": 3, "total_steps": 5, "loss": 5.1, ...}

and the final result from the record the driver writes next to the job's spec in S3 (`jobs/<id>/result.json`:
run id, model name, version, metrics), in one PUT after the adapter is registered: nothing is read from output
that a worker's print could imitate or a truncated log could lose.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from peftray.service.executor import RayExecutor
from peftray.service.settings import ServiceSettings
from peftray.service.store import ACTIVE, CANCELLED, FAILED, RUNNING, STARTING, SUCCEEDED, JobRecord, JobStore

log = logging.getLogger("peftray.service")
PROGRESS = "PEFTRAY_PROGRESS "
ERROR_CHARS = 8000
# Ray's log API returns the whole log: once a job reports progress, read it at most this often.
PROGRESS_SCAN_S = 2.0


def parse_marked(text: str, marker: str) -> list[dict[str, Any]]:
    """Every JSON object printed after `marker` in `text` (Ray may prefix worker lines with `(pid=..)`)."""
    found = []
    for line in text.splitlines():
        at = line.find(marker)
        if at < 0:
            continue
        try:
            value = json.loads(line[at + len(marker):])
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


class Scheduler:
    """One background thread per service process; safe to run in several processes on one database."""

    def __init__(self, store: JobStore, executor: RayExecutor, settings: ServiceSettings):
        self.store, self.executor, self.settings = store, executor, settings
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._scanned: dict[str, float] = {}  # job id -> monotonic time its log was last read

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="peftray-scheduler", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run the next pass now (a job was submitted), not after the rest of `poll_s`."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - Ray or the database may blip; the next pass retries
                log.exception("scheduler pass failed")
            self._wake.wait(self.settings.poll_s)
            self._wake.clear()

    def tick(self) -> None:
        """One pass: reconcile every active job with Ray, then start queued jobs while the limits allow."""
        active = self.store.jobs_in(ACTIVE)
        self._scanned = {k: v for k, v in self._scanned.items() if k in {j.id for j in active}}
        for job in active:
            self.sync(job)
        while not self._stop.is_set():
            job = self.store.claim_next(self.settings.max_running, self.settings.max_running_per_user)
            if job is None:
                break
            self.launch(job)

    def launch(self, job: JobRecord) -> None:
        """Submit a `starting` job to Ray and record its Ray id (or fail it with the reason)."""
        if job.cancel_requested:
            self.store.transition(job.id, CANCELLED, "cancelled before it reached Ray", [STARTING])
            return
        try:
            ray_id = self.executor.submit(job.id, job.owner, job.spec, self.store.user_is_admin(job.owner))
        except Exception as exc:  # noqa: BLE001 - any failure to hand over is the job's failure, said plainly
            self.store.transition(job.id, FAILED, "could not submit the job to Ray", [STARTING],
                                  error=f"{type(exc).__name__}: {exc}"[-ERROR_CHARS:])
            return
        self.store.update(job.id, ray_job_id=ray_id)

    def sync(self, job: JobRecord) -> None:
        """Bring one active job's record in line with Ray."""
        ray_id = job.ray_job_id or self.executor.submission_id(job.id)
        info = self.executor.info(ray_id)
        if info is None:
            if job.state == STARTING and not job.ray_job_id:
                self.launch(job)  # the service stopped between admitting the job and handing it to Ray
            else:
                self.store.transition(job.id, FAILED, "Ray has no record of this job (was the cluster restarted?)",
                                      ACTIVE)
            return
        if not job.ray_job_id:
            self.store.update(job.id, ray_job_id=ray_id)
        if job.cancel_requested and info.status in ("PENDING", "RUNNING"):
            self.executor.stop(ray_id)
        text = ""
        if info.status != "PENDING" and (info.status != "RUNNING" or self._scan_due(job)):
            text = self.executor.logs(ray_id)
            self._record_progress(job, text)
        if info.status == "RUNNING":
            self.store.transition(job.id, RUNNING, "the Ray job is running", [STARTING])
        elif info.status == "SUCCEEDED":
            self._succeeded(job)
        elif info.status == "FAILED":
            tail = "\n".join(text.splitlines()[-40:])
            error = f"{info.message or 'the Ray job failed'}\n--- last lines of the job log ---\n{tail}"
            self.store.transition(job.id, FAILED, "training failed", ACTIVE, error=error[-ERROR_CHARS:])
        elif info.status == "STOPPED":
            reason = "cancelled on request" if job.cancel_requested else "stopped outside the service"
            self.store.transition(job.id, CANCELLED, reason, ACTIVE)

    def _scan_due(self, job: JobRecord) -> bool:
        """Read a running job's log every pass until its first progress line, then every PROGRESS_SCAN_S."""
        now = time.monotonic()
        if job.progress and now - self._scanned.get(job.id, 0.0) < PROGRESS_SCAN_S:
            return False
        self._scanned[job.id] = now
        return True

    def _record_progress(self, job: JobRecord, text: str) -> None:
        """One `progress` event per read (the newest step), so a fast job cannot flood the event table."""
        last = (job.progress or {}).get("step", -1)
        newer = [p for p in parse_marked(text, PROGRESS) if isinstance(p.get("step"), int) and p["step"] > last]
        if newer:
            self.store.add_event(job.id, "progress", newer[-1])
            self.store.update(job.id, progress=newer[-1])

    def _succeeded(self, job: JobRecord) -> None:
        result = self.executor.read_result(job.id)
        if result is None:
            self.store.transition(job.id, SUCCEEDED, "the job exited 0 but wrote no result record "
                                  f"({self.executor.result_uri(job.id)})", ACTIVE)
            return
        version = result.get("version")
        fields = {"mlflow_run_id": result.get("run_id"), "model_name": result.get("model_name"),
                  "model_version": None if version is None else str(version), "metrics": result.get("metrics")}
        if self.store.transition(job.id, SUCCEEDED, "training finished and the adapter is registered", ACTIVE,
                                 **fields):
            self.store.add_event(job.id, "result", result)

