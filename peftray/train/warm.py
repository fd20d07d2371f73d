"""A warm runner: a long-lived process (a Ray actor the service starts) that trains one-worker CPU jobs.

Submitting a tiny job through Ray Jobs + Ray Train spends its seconds starting processes and importing torch:
a driver, Ray Train's controller, its worker. A runner is started ahead of time, imports everything once and
then runs the jobs the service hands it, one at a time, in the order given (`run`), each through the very
`run_job` a Ray job runs (its own MLflow run, checkpoints, registered version, result record), trained in
this process (`peftray.train.in_process`).

- Isolation: a runner works for one owner only (the service never hands it another user's job); a job that
  fails ends the runner's life after it (the service starts a fresh one), and a cancelled job stops after its
  current step, or its runner is killed.
- Logs: everything the job prints is kept per job (`logs`) and stored with its end state in
  `<bucket>/jobs/<id>/runner.json` when it ends, for when the runner is gone.
- Nothing of the job reaches the actor's metadata: the arguments are names and URIs, as a Ray job's are.

`RunnerCore` is the plain-Python part (tested without Ray); the service wraps it in a Ray actor class.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
import traceback
from typing import Any

PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"
ENDED = (SUCCEEDED, FAILED, STOPPED)
LOG_CHARS = 1 << 20  # per job, the newest part


def status_uri(bucket: str, job_id: str) -> str:
    """Where a runner stores a job's end state and log (one PUT) when the job ends."""
    return f"s3://{bucket}/jobs/{job_id}/runner.json"


class _JobOutput(io.TextIOBase):
    """sys.stdout / sys.stderr of a runner: each write goes to the process's stream and, while a job runs,
    to that job's log."""

    def __init__(self, stream, core: "RunnerCore"):
        self.stream, self.core = stream, core

    def write(self, text: str) -> int:
        self.core._append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()


class RunnerCore:
    """Jobs run one at a time by `run`; `status`, `logs`, `cancel` answer from other threads meanwhile."""

    def __init__(self, idle_s: float = 600.0, capture: bool = True):
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._current: str | None = None
        self._cancelled: set[str] = set()
        self._busy = 0  # jobs accepted and not ended
        self._spent = False  # a job failed here: run nothing more in this process
        self._fs = None
        self._owner: str | None = None
        self.idle_s = idle_s
        self._last_active = time.monotonic()
        if capture:  # a runner's whole output is its jobs' logs
            sys.stdout = _JobOutput(sys.stdout, self)
            sys.stderr = _JobOutput(sys.stderr, self)

    @staticmethod
    def warm_up() -> None:
        """Import what every job needs (seconds, once per runner instead of once per job)."""
        import mlflow  # noqa: F401
        import pyarrow.fs  # noqa: F401
        import s3fs  # noqa: F401
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401

        import peftray.train.in_process  # noqa: F401
        import peftray.train.run  # noqa: F401
        import peftray.registry  # noqa: F401

    def _append(self, text: str) -> None:
        job = self._current
        if job is None:
            return
        with self._lock:
            entry = self._jobs.get(job)
            if entry is not None:
                entry["log"].append(text)
                entry["chars"] += len(text)
                while entry["chars"] > LOG_CHARS and len(entry["log"]) > 1:
                    entry["chars"] -= len(entry["log"].pop(0))

    def accept(self, job_id: str, owner: str) -> bool:
        """Take `job_id` into this runner's queue (before `run` is called for it); False if it runs no more
        jobs (one failed here) or works for another owner (the first job's decides)."""
        with self._lock:
            if self._spent or self._owner not in (None, owner):
                return False
            self._owner = owner
            if job_id not in self._jobs:
                self._jobs[job_id] = {"state": PENDING, "message": None, "log": [], "chars": 0}
                self._busy += 1
            self._last_active = time.monotonic()
            return True

    def status(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._jobs.get(job_id)
            return None if entry is None else {"state": entry["state"], "message": entry["message"]}

    def logs(self, job_id: str) -> str | None:
        with self._lock:
            entry = self._jobs.get(job_id)
            return None if entry is None else "".join(entry["log"])

    def cancel(self, job_id: str, bucket: str | None = None) -> str | None:
        """Stop `job_id`: one still queued here at once (it will not run), a running one after its current step.
        Returns its state before the call, None if unknown."""
        with self._lock:
            self._cancelled.add(job_id)
            entry = self._jobs.get(job_id)
            if entry is None:
                return None
            state = entry["state"]
            if state == PENDING:
                entry["state"], entry["message"] = STOPPED, "cancelled on request before it started"
                self._busy -= 1
                self._last_active = time.monotonic()
        if state == PENDING and bucket is not None:
            self._store(bucket, job_id, entry)
        return state

    def load(self) -> dict[str, Any]:
        with self._lock:
            return {"busy": self._busy, "spent": self._spent, "pid": os.getpid(), "owner": self._owner,
                    "idle_s": 0.0 if self._busy else time.monotonic() - self._last_active}

    def idle_too_long(self) -> bool:
        with self._lock:
            return self._busy == 0 and time.monotonic() - self._last_active > self.idle_s

    def run(self, job_id: str, spec_uri: str, result_uri: str, owner: str, owner_is_admin: bool,
            bucket: str) -> str:
        """Run one job to its end here; returns its end state. Never raises: the state says how it ended."""
        from peftray.errors import PeftrayError
        from peftray.train.in_process import Cancelled
        from peftray.train.run import run_job

        with self._lock:
            if self._owner not in (None, owner):  # never: the service places by owner; refused all the same
                return FAILED
            self._owner = owner
            if job_id not in self._jobs:  # accepted before a failure made this runner spent: it runs still
                self._jobs[job_id] = {"state": PENDING, "message": None, "log": [], "chars": 0}
                self._busy += 1
            entry = self._jobs[job_id]
            if entry["state"] == STOPPED:  # cancelled while it waited here
                return STOPPED
            self._current = job_id
            entry["state"] = RUNNING
        state, message = FAILED, None
        try:
            if job_id in self._cancelled:
                raise Cancelled(f"job {job_id} was cancelled before it started")
            print(f"peftray: job {job_id} runs in warm runner pid {os.getpid()}", flush=True)
            result = run_job(spec_uri, job_id=job_id, owner=owner, owner_is_admin=owner_is_admin, in_process=True,
                             should_stop=lambda: job_id in self._cancelled)
            from peftray.train.__main__ import write_record

            record = json.dumps(result.to_dict(), default=str)
            write_record(result_uri, record, self._storage())
            print("PEFTRAY_RESULT " + record, flush=True)
            state = SUCCEEDED
        except Cancelled as exc:
            state, message = STOPPED, str(exc)
        except PeftrayError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            message = f"the job failed: {exc}"
        except BaseException as exc:  # noqa: BLE001 - reported as the job's failure; the runner retires
            traceback.print_exc()
            message = f"the job failed: {type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._current = None
                entry["state"], entry["message"] = state, message
                if state != SUCCEEDED:
                    self._spent = True  # what a failed job left in this process is not the next job's
            self._store(bucket, job_id, entry)
            with self._lock:
                self._busy -= 1
                self._last_active = time.monotonic()
        return state

    def _storage(self):
        """This runner's s3fs filesystem, made once (a new one costs a client's set-up)."""
        if self._fs is None:
            from peftray.endpoints import load_config

            self._fs = load_config().s3fs()
        return self._fs

    def _store(self, bucket: str, job_id: str, entry: dict[str, Any]) -> None:
        try:
            body = {"state": entry["state"], "message": entry["message"], "log": "".join(entry["log"])}
            self._storage().pipe_file(status_uri(bucket, job_id)[len("s3://"):], json.dumps(body).encode())
        except Exception:  # noqa: BLE001 - the service still asks this runner while it lives
            traceback.print_exc()


_ACTOR_CLASS = None


def runner_actor_class():
    """`RunnerCore` as a Ray actor class: `run` in a group of one thread (jobs in the order given), the rest
    in an `io` group that answers while a job trains. A thread ends the process once it is idle `idle_s`."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is not None:
        return _ACTOR_CLASS
    import ray

    @ray.remote(concurrency_groups={"jobs": 1, "io": 4}, max_restarts=0)
    class WarmRunner:
        def __init__(self, idle_s: float):
            self.core = RunnerCore(idle_s)
            self.core.warm_up()
            threading.Thread(target=self._retire_when_idle, daemon=True, name="peftray-runner-idle").start()

        def _retire_when_idle(self) -> None:
            while not self.core.idle_too_long():
                time.sleep(min(5.0, max(0.5, self.core.idle_s / 4)))
            os._exit(0)  # detached: nothing else ends it

        @ray.method(concurrency_group="io")
        def ready(self) -> dict[str, Any]:
            return self.core.load()

        @ray.method(concurrency_group="io")
        def accept(self, job_id: str, owner: str) -> bool:
            return self.core.accept(job_id, owner)

        @ray.method(concurrency_group="io")
        def status(self, job_id: str) -> dict[str, Any] | None:
            return self.core.status(job_id)

        @ray.method(concurrency_group="io")
        def logs(self, job_id: str) -> str | None:
            return self.core.logs(job_id)

        @ray.method(concurrency_group="io")
        def cancel(self, job_id: str, bucket: str) -> str | None:
            return self.core.cancel(job_id, bucket)

        @ray.method(concurrency_group="jobs")
        def run(self, job_id: str, spec_uri: str, result_uri: str, owner: str, owner_is_admin: bool,
                bucket: str) -> str:
            return self.core.run(job_id, spec_uri, result_uri, owner, owner_is_admin, bucket)

    _ACTOR_CLASS = WarmRunner
    return WarmRunner
