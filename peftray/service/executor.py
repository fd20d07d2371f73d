"""The executor: runs a validated job spec as a Ray job through the Jobs API (`JobSubmissionClient`).

The service alone decides what runs on the cluster: the entrypoint is always `python -m peftray.train` on the
spec it stored in object storage, and the runtime environment carries only the endpoints from the service's own
config. Nothing from the request (a command, a runtime_env, env vars) reaches Ray, and no secret either: Ray
shows a job's runtime_env to anyone who lists jobs and writes it into its logs, so the job finds its credentials
in its node's environment or the stack's 0600 state file (`Config.public_env`).
"""

from __future__ import annotations

import json
import shlex
import threading
from typing import Any

from peftray.endpoints import ray_train_env
from peftray.service.ray_info import RayJobInfo
from peftray.service.settings import ServiceSettings

# The control plane's address: a training job has no use for it.
_NOT_FOR_JOBS = ("PEFTRAY_SERVICE_URL",)


class RayExecutor:
    """Submit, inspect, stop and read the logs of the Ray jobs behind peftray jobs."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.config = settings.config
        self._client = None
        self._fs = None
        self._lock = threading.Lock()
        self.warm = None
        if settings.warm_runners > 0:
            from peftray.service.warm_pool import WarmPool

            self.warm = WarmPool(settings, self)

    @property
    def client(self):
        # Created on first use: the constructor calls the dashboard, which may still be starting.
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                if not self.config.ray_dashboard_url:
                    from peftray.errors import ConfigError

                    raise ConfigError("the service has no Ray dashboard URL: set PEFTRAY_RAY_DASHBOARD_URL "
                                      "or start the local stack (`peftray stack up`)")
                token = self.config.ray_auth_token
                headers = {"Authorization": f"Bearer {token}"} if token else None
                self._client = JobSubmissionClient(self.config.ray_dashboard_url, headers=headers)
            return self._client

    def fs(self):
        """One s3fs filesystem for the service's calls (a new one costs a client's set-up, ~0.1-0.3 s): the
        scheduler reads and writes a few objects per job and pass."""
        with self._lock:
            if self._fs is None:
                self._fs = self.config.s3fs()
            return self._fs

    @staticmethod
    def submission_id(job_id: str) -> str:
        """Ray's id for a peftray job; deterministic, so a restarted service finds (and never re-runs) it."""
        return f"peftray-{job_id}"

    def spec_uri(self, job_id: str) -> str:
        return f"s3://{self.config.bucket}/jobs/{job_id}/spec.json"

    def result_uri(self, job_id: str) -> str:
        """Where the driver writes the job's result record (one atomic PUT) once the adapter is registered."""
        return f"s3://{self.config.bucket}/jobs/{job_id}/result.json"

    def read_result(self, job_id: str) -> dict[str, Any] | None:
        """The job's result record, or None if the driver wrote none."""
        fs = self.fs()
        fs.invalidate_cache()
        try:
            value = json.loads(fs.cat_file(self.result_uri(job_id)[len("s3://"):]))
        except FileNotFoundError:
            return None
        return value if isinstance(value, dict) else None

    def runtime_env(self) -> dict[str, Any]:
        """Built from the service's config only: endpoints (no secrets), unbuffered output, no log dedup, Ray Train
        tuning (`RAY_TRAIN_ENV`)."""
        env = {k: v for k, v in self.config.public_env().items() if k not in _NOT_FOR_JOBS}
        env.update({"PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"})
        env.update(ray_train_env())  # quicker Ray Train start and end
        return {"env_vars": env}

    def entrypoint(self, job_id: str, owner: str, owner_is_admin: bool = False) -> str:
        """The driver's command: the stored spec, the job id and the owner (whose adapter names it may write
        and under whose prefix its run and checkpoints live). Names only: no secret is on a command line."""
        parts = [self.settings.job_python, "-m", "peftray.train", "--spec", self.spec_uri(job_id), "--job-id", job_id,
                 "--result", self.result_uri(job_id), "--owner", owner, *(["--owner-is-admin"] if owner_is_admin else [])]
        return " ".join(shlex.quote(p) for p in parts)

    def _is_warm(self, ray_id: str) -> bool:
        from peftray.service.warm_pool import PREFIX

        return ray_id.startswith(PREFIX)

    def _warm_pool(self):
        if self.warm is None:  # a job handed to warm runners before this service's restart without them
            from peftray.service.warm_pool import WarmPool

            self.warm = WarmPool(self.settings, self)
        return self.warm

    def submit(self, job_id: str, owner: str, spec: dict[str, Any], owner_is_admin: bool = False) -> str:
        """Store the spec at `spec_uri(job_id)` and start the job: on a warm runner when it needs one CPU worker
        and the service keeps runners, else as a Ray job. Returns the job's Ray-side id."""
        fs = self.fs()
        fs.pipe_file(self.spec_uri(job_id)[len("s3://"):], json.dumps(spec, indent=1).encode())
        if self.warm is not None:
            from peftray.jobspec import JobSpec
            from peftray.train.run import in_process_eligible

            parsed = JobSpec.model_validate(spec)
            if in_process_eligible(parsed):
                return self.warm.submit(job_id, owner, owner_is_admin, parsed.training.max_failures)
        return self.client.submit_job(
            entrypoint=self.entrypoint(job_id, owner, owner_is_admin),
            submission_id=self.submission_id(job_id),
            runtime_env=self.runtime_env(),
            metadata={"peftray_job_id": job_id, "peftray_owner": owner},
        )

    def info(self, ray_id: str) -> RayJobInfo | None:
        """Ray's view of the job, or None if Ray has no job with this id."""
        if self._is_warm(ray_id):
            return self._warm_pool().info(ray_id)
        try:
            details = self.client.get_job_info(ray_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return None
            raise
        return RayJobInfo(status=str(getattr(details.status, "value", details.status)), message=details.message)

    def stop(self, ray_id: str) -> bool:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL); its Ray Train workers die with their driver."""
        if self._is_warm(ray_id):
            return self._warm_pool().stop(ray_id)
        try:
            return bool(self.client.stop_job(ray_id))
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return False
            raise

    def logs(self, ray_id: str) -> str:
        """The job's driver output so far (worker output included, prefixed by Ray); "" if Ray has no such job."""
        if self._is_warm(ray_id):
            return self._warm_pool().logs(ray_id)
        try:
            return self.client.get_job_logs(ray_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return ""
            raise
