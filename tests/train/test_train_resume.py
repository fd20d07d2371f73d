"""A worker that dies right after uploading a checkpoint, before Ray Train's controller heard of it.

Runs the way the control plane runs a job (a Ray job with `python -m peftray.train` on a spec in S3), so the
job's own log is the one the service shows.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from peftray.jobspec import load_spec
from peftray.service.executor import RayExecutor
from peftray.service.scheduler import PROGRESS, parse_marked
from peftray.service.settings import ServiceSettings

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _wait_done(client, ray_id: str, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(ray_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"Ray job {ray_id} did not end; log:\n{client.get_job_logs(ray_id)[-3000:]}")


def test_checkpoint_written_after_the_last_poll_is_resumed_and_progress_printed_once(stack, tiny_model, tmp_path):
    from peftray.registry.client import mlflow_client

    name = f"t{uuid.uuid4().hex[:8]}"
    spec = load_spec(str(REPO / "jobs" / "tiny-lora-instruct.yaml"), [
        f"name={name}", f"base_model.path={tiny_model}", f"registry.model_name={name}", "registry.promote=null",
        "training.max_steps=18", "training.checkpoint_every=5", "training.eval_every=null", "resources.num_workers=1",
        f"dataset.source={REPO / 'jobs' / 'data' / 'tiny_instruct.jsonl'}"]).model_dump(mode="json")
    executor = RayExecutor(ServiceSettings(config=stack, db_url=f"sqlite:///{tmp_path / 'jobs.db'}"))
    job_id = f"job-{name}"
    executor.config.s3fs().pipe_file(executor.spec_uri(job_id)[len("s3://"):], json.dumps(spec).encode())
    env = executor.runtime_env()
    # the only worker dies before its 16th step, right after uploading the step-15 checkpoint (no wait for a poll)
    env["env_vars"].update(PEFTRAY_TEST_CRASH_AT_STEP="15", PEFTRAY_TEST_CRASH_RANK="0", PEFTRAY_TEST_CRASH_WAIT_S="0")
    ray_id = executor.client.submit_job(entrypoint=executor.entrypoint(job_id), runtime_env=env,
                                        submission_id=executor.submission_id(job_id))
    status = _wait_done(executor.client, ray_id)
    log = executor.logs(ray_id)
    assert status == "SUCCEEDED", log[-3000:]
    result = parse_marked(log, "PEFTRAY_RESULT ")[-1]
    resumed = [m.value for m in mlflow_client(stack).get_metric_history(result["run_id"], "resumed_from_step")]
    assert resumed == [15.0], f"resumed from {resumed}; at most checkpoint_every (5) steps may be lost"
    steps = Counter(p["step"] for p in parse_marked(log, PROGRESS) if p.get("job") == name)
    assert steps == Counter(range(1, 19)), f"progress lines per step: {dict(steps)}"
