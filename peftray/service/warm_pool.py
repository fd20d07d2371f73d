"""Warm runners: jobs of one CPU worker run in processes started ahead of time, not as new Ray jobs.

A tiny job's half minute through Ray Jobs + Ray Train goes to starting a driver, a controller and a worker and
importing torch in each. The service keeps up to `warm_runners` Ray actors (`peftray.train.warm.WarmRunner`)
that have imported everything already, and hands them the jobs that need no more than one CPU worker
(`peftray.train.run.in_process_eligible`); everything else goes through Ray Jobs as before.

Rules, so that sharing a process costs no user anything:
- a runner works for one owner: the first job it gets decides whose; another user's job never runs there;
- a runner runs its jobs one at a time, in order; a job that fails retires its runner afterwards;
- cancelling a job stops it after its current step; if it has not stopped within `CANCEL_GRACE_S`, its
  runner is killed, and the other jobs queued there move to another runner;
- a runner that dies (killed, out of memory) fails its running job, or runs it again from its newest
  checkpoint up to `training.max_failures` times, as Ray Train does; the jobs queued there move on;
- runners are detached actors in the `peftray-runners` namespace and end themselves after
  `warm_idle_s` without a job, so a service restart finds its running jobs and nothing idles forever.

Each job keeps its own MLflow run, checkpoints, result record and registered version (the runner calls the
same `run_job`); its log is the runner's output while it ran, stored with its end state
(`jobs/<id>/runner.json`) when it ends.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from peftray.service.ray_info import RayJobInfo
from peftray.service.settings import ServiceSettings

log = logging.getLogger("peftray.service")
NAMESPACE = "peftray-runners"
PREFIX = "warm-"  # a warm job's id in the job store's `ray_job_id`: warm-<job id>
CANCEL_GRACE_S = 10.0
CALL_S = 30.0  # how long one call to a runner may take before it counts as gone
START_S = 180.0  # how long a new runner may take to start (imports on a busy machine)


@dataclass
class _Runner:
    name: str
    handle: Any
    owner: str | None = None
    jobs: list[str] = field(default_factory=list)  # accepted, not seen ended (in order)
    dead: bool = False


@dataclass
class _Job:
    owner: str
    is_admin: bool
    runner: str
    attempts: int = 1
    max_failures: int = 0
    cancelled: bool = False


def _state_to_ray(state: str) -> str:
    return {"PENDING": "PENDING", "RUNNING": "RUNNING", "SUCCEEDED": "SUCCEEDED", "FAILED": "FAILED",
            "STOPPED": "STOPPED"}.get(state, "FAILED")


class WarmPool:
    """The service's warm runners; methods mirror `RayExecutor`'s (submit, info, stop, logs) for warm jobs."""

    def __init__(self, settings: ServiceSettings, executor):
        """`executor`: the service's `RayExecutor`, whose spec and result URIs, s3fs filesystem and job
        environment (`runtime_env`: endpoints, no secrets) the runners share."""
        self.settings, self.config = settings, settings.config
        self._executor = executor
        self._fs = executor.fs
        # no more runners than jobs may run at once (a user's jobs beyond that queue on their runners)
        self.size = min(settings.warm_runners, settings.max_running or settings.warm_runners)
        self._lock = threading.RLock()
        self._runners: dict[str, _Runner] = {}
        self._jobs: dict[str, _Job] = {}
        self._connected = False

    # -- Ray ---------------------------------------------------------------------------------------------
    def _connect(self) -> None:
        if self._connected:
            return
        from peftray.train.run import connect_ray

        # no log_to_driver: the runners' output is the jobs' logs, not the service's
        connect_ray(self.config, namespace=NAMESPACE, log_to_driver=False)
        self._connected = True

    def _start_runner(self) -> _Runner:
        from peftray.train.warm import runner_actor_class

        name = f"peftray-runner-{uuid.uuid4().hex[:12]}"
        # num_cpus=0: the service's max_running admits jobs; the runner takes its job's threads itself
        handle = runner_actor_class().options(
            name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
            runtime_env=self._executor.runtime_env()).remote(self.settings.warm_idle_s)
        runner = _Runner(name, handle)
        self._runners[name] = runner
        return runner

    def warm(self) -> None:
        """Start spare runners until `size` runners live (none is waited for)."""
        if self.size <= 0:
            return
        with self._lock:
            self._connect()
            live = [r for r in self._runners.values() if not r.dead]
            for _ in range(self.size - len(live)):
                self._start_runner()

    def _drop(self, runner: _Runner) -> None:
        with self._lock:
            runner.dead = True
            self._runners.pop(runner.name, None)

    def _call(self, runner: _Runner, method: str, *args, timeout: float = CALL_S):
        import ray

        return ray.get(getattr(runner.handle, method).remote(*args), timeout=timeout)

    # -- placing jobs ------------------------------------------------------------------------------------
    def _pick(self, owner: str) -> _Runner:
        """Owner's idle runner > a spare > a new runner (up to `size`) > the owner's least busy runner >
        a new runner beyond `size` (an idle one of another owner retires for it)."""
        live = [r for r in self._runners.values() if not r.dead]
        mine = [r for r in live if r.owner == owner]
        idle = [r for r in mine if not r.jobs]
        if idle:
            return idle[0]
        spares = [r for r in live if r.owner is None]
        if spares:
            return spares[0]
        if len(live) < self.size:
            return self._start_runner()
        if mine:
            return min(mine, key=lambda r: len(r.jobs))
        for other in live:
            if not other.jobs and len(live) >= self.size:
                self._retire(other)
                break
        return self._start_runner()

    def _retire(self, runner: _Runner) -> None:
        import ray

        self._drop(runner)
        try:
            ray.kill(runner.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def submit(self, job_id: str, owner: str, is_admin: bool, max_failures: int) -> str:
        """Hand a stored job (its spec at `spec_uri(job_id)`) to a runner; returns the job's `ray_job_id`."""
        with self._lock:
            self._connect()
            self._place(job_id, _Job(owner, is_admin, "", max_failures=max_failures))
            self.warm()  # a spare for the next user, while there is room
        return PREFIX + job_id

    def _place(self, job_id: str, job: _Job) -> None:
        for _ in range(4):
            runner = self._pick(job.owner)
            try:
                if not self._call(runner, "accept", job_id, job.owner, timeout=START_S):
                    self._drop(runner)  # spent (a job failed there), or another owner's: not used again
                    continue
            except Exception:  # noqa: BLE001 - died or cannot start: try another
                self._retire(runner)
                continue
            runner.owner = job.owner
            runner.jobs.append(job_id)
            job.runner = runner.name
            self._jobs[job_id] = job
            runner.handle.run.remote(job_id, self._executor.spec_uri(job_id), self._executor.result_uri(job_id), job.owner,
                                     job.is_admin, self.config.bucket)
            self._store_assignment(job_id, runner.name)
            return
        raise RuntimeError("no warm runner could take the job (they died while starting)")

    def _store_assignment(self, job_id: str, name: str) -> None:
        fs = self._fs()
        fs.pipe_file(f"{self.config.bucket}/jobs/{job_id}/runner-name", name.encode())

    def _runner_of(self, job_id: str) -> _Runner | None:
        """The runner a job was given, from memory or (after a service restart) from storage."""
        with self._lock:
            job = self._jobs.get(job_id)
            name = job.runner if job else None
        if name is None:
            try:
                fs = self._fs()
                fs.invalidate_cache()
                name = fs.cat_file(f"{self.config.bucket}/jobs/{job_id}/runner-name").decode()
            except FileNotFoundError:
                return None
        with self._lock:
            runner = self._runners.get(name)
            if runner is not None:
                return runner
            import ray

            self._connect()
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                return _Runner(name, None, dead=True)
            runner = _Runner(name, handle)
            try:  # found again after a restart: it keeps working for its owner only
                runner.owner = self._call(runner, "ready")["owner"]
            except Exception:  # noqa: BLE001 - gone meanwhile
                runner.dead = True
                return runner
            runner.jobs.append(job_id)
            self._runners[name] = runner
            return runner

    def _stored_end(self, job_id: str) -> dict[str, Any] | None:
        from peftray.train.warm import status_uri

        fs = self._fs()
        fs.invalidate_cache()
        try:
            value = json.loads(fs.cat_file(status_uri(self.config.bucket, job_id)[len("s3://"):]))
        except FileNotFoundError:
            return None
        return value if isinstance(value, dict) else None

    # -- what the scheduler asks ---------------------------------------------------------------------------
    def info(self, ray_id: str):
        job_id = ray_id[len(PREFIX):]
        runner = self._runner_of(job_id)
        if runner is None:
            return None
        if not runner.dead:
            try:
                status = self._call(runner, "status", job_id)
            except Exception:  # noqa: BLE001 - the actor died (or was killed)
                self._drop(runner)
                status = None
            if status is not None:
                if status["state"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                    self._ended(runner, job_id, failed=status["state"] != "SUCCEEDED")
                return RayJobInfo(_state_to_ray(status["state"]), status["message"])
        stored = self._stored_end(job_id)
        if stored is not None:
            return RayJobInfo(_state_to_ray(stored.get("state", "FAILED")), stored.get("message"))
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.cancelled:
                return RayJobInfo("STOPPED", "cancelled on request; its runner was stopped")
            started = job is not None and runner.jobs[:1] == [job_id]
            if job is not None and not started and job_id in runner.jobs:
                runner.jobs.remove(job_id)  # queued behind the job that was running: it moves on as it was
                self._place(job_id, job)
                return RayJobInfo("PENDING", "its runner died before it started; moved to another")
            if job is not None and job.attempts <= job.max_failures:
                runner.jobs = [j for j in runner.jobs if j != job_id]
                job.attempts += 1
                log.warning("warm runner %s of job %s died; running it again from its newest checkpoint "
                            "(attempt %d)", runner.name, job_id, job.attempts)
                self._place(job_id, job)
                return RayJobInfo("RUNNING", "its runner died; resumed on another")
        return RayJobInfo("FAILED", f"the warm runner {runner.name} that ran this job died (killed, or out of "
                                    "memory) and left no end state")

    def _ended(self, runner: _Runner, job_id: str, failed: bool) -> None:
        with self._lock:
            if job_id in runner.jobs:
                runner.jobs.remove(job_id)
            self._jobs.pop(job_id, None)
            if failed and not runner.jobs:
                self._retire(runner)  # what a failed job left in that process is nobody's next job
                self.warm()

    def logs(self, ray_id: str) -> str:
        job_id = ray_id[len(PREFIX):]
        runner = self._runner_of(job_id)
        if runner is not None and not runner.dead:
            try:
                text = self._call(runner, "logs", job_id)
                if text is not None:
                    return text
            except Exception:  # noqa: BLE001 - gone: the stored log follows
                pass
        stored = self._stored_end(job_id)
        return (stored or {}).get("log") or ""

    def stop(self, ray_id: str) -> bool:
        """Cancel a warm job: after its current step, or by killing its runner after `CANCEL_GRACE_S`."""
        job_id = ray_id[len(PREFIX):]
        runner = self._runner_of(job_id)
        if runner is None or runner.dead:
            return False
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                if job.cancelled:
                    return True
                job.cancelled = True
        try:
            state = self._call(runner, "cancel", job_id, self.config.bucket)
        except Exception:  # noqa: BLE001
            return False
        if state == "RUNNING":
            threading.Thread(target=self._kill_if_still_running, args=(runner, job_id), daemon=True,
                             name=f"peftray-cancel-{job_id}").start()
        return state in ("PENDING", "RUNNING")

    def _kill_if_still_running(self, runner: _Runner, job_id: str) -> None:
        deadline = time.monotonic() + CANCEL_GRACE_S
        while time.monotonic() < deadline:
            try:
                status = self._call(runner, "status", job_id)
            except Exception:  # noqa: BLE001 - gone already
                return
            if status is None or status["state"] != "RUNNING":
                return
            time.sleep(0.25)
        from peftray.train.warm import status_uri

        try:
            text = self._call(runner, "logs", job_id) or ""
        except Exception:  # noqa: BLE001
            text = ""
        body = {"state": "STOPPED", "message": f"cancelled on request; its runner was stopped after "
                                                f"{CANCEL_GRACE_S:.0f} s", "log": text}
        self._fs().pipe_file(status_uri(self.config.bucket, job_id)[len("s3://"):], json.dumps(body).encode())
        with self._lock:
            self._retire(runner)
            others = [j for j in runner.jobs if j != job_id]
            for other in others:  # queued behind the cancelled one: they move to another runner
                job = self._jobs.get(other)
                if job is not None:
                    self._place(other, job)
            self.warm()

    def close(self) -> None:
        """Retire the idle runners (busy ones finish their jobs, then idle out)."""
        with self._lock:
            for runner in list(self._runners.values()):
                if not runner.jobs and not runner.dead:
                    self._retire(runner)
