"""A worker killed right after uploading a checkpoint, before Ray Train's controller heard of it.

Runs the way the control plane runs a job (a Ray job with `python -m peftray.train` on a spec in S3), so the
job's own log is the one the service shows. The worker is SIGKILLed from outside, as the OOM killer would: a
worker's report uploads its checkpoint and then waits for the controller's next poll (every 0.25 s), and the kill
lands in that wait, when Ray knows only the checkpoint before.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from peftray.jobspec import load_spec
from peftray.service.executor import RayExecutor
from peftray.service.scheduler import PROGRESS, parse_marked
from peftray.service.settings import ServiceSettings
from peftray.train.run import run_folder

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


def _complete_checkpoint(fs, root: str, step: int) -> bool:
    from peftray.train import checkpoint

    folder = f"{root}/{checkpoint.folder_name(step)}"
    fs.invalidate_cache()
    return all(fs.exists(f"{folder}/{name}") for name in checkpoint.FILES)


def _newest_complete_checkpoint(fs, root: str) -> int:
    from peftray.train import checkpoint

    fs.invalidate_cache()
    steps = sorted((checkpoint.step_of(p) for p in fs.ls(root, detail=False)), reverse=True)
    return next((s for s in steps if s > 0 and _complete_checkpoint(fs, root, s)), -1)


def _training_worker(client, address: str, ray_id: str, done: threading.Event):
    """The job's one live Ray Train worker, once it exists (looked up before the kill is due: listing actors takes
    seconds on a busy machine, and the kill must land within a few steps of the checkpoint)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 600
    while True:
        assert not done.is_set(), "the job ended before its worker was found"
        assert time.monotonic() < deadline, "no training worker appeared"
        job_id = client.get_job_info(ray_id).job_id
        workers = [a for a in list_actors(address=address,
                                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                          detail=True, raise_on_missing_output=False) if a.job_id == job_id and a.pid]
        assert len(workers) <= 1, workers
        if workers:
            return workers[0]
        time.sleep(0.2)


def _kill_worker_once_stored(client, address: str, ray_id: str, fs, root: str, step: int,
                             done: threading.Event) -> tuple[int, int]:
    """SIGKILL the job's training worker as soon as the checkpoint of `step` is wholly in storage; returns the pid
    and the newest checkpoint wholly in storage once it is dead (what the retry must resume from)."""
    worker = _training_worker(client, address, ray_id, done)
    deadline = time.monotonic() + 600
    while not _complete_checkpoint(fs, root, step):
        assert not done.is_set(), "the job ended before it could be interrupted"
        assert time.monotonic() < deadline, f"no checkpoint of step {step} appeared"
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    while not _dead(worker.pid):  # once the kill has landed nothing uploads any more
        assert time.monotonic() < deadline, f"worker {worker.pid} outlived SIGKILL"
        time.sleep(0.01)
    return worker.pid, _newest_complete_checkpoint(fs, root)


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie runs no code; its parent reaps it when it gets to it


def test_checkpoint_written_after_the_last_poll_is_resumed_and_progress_printed_once(stack, tiny_model, tmp_path):
    from peftray.registry.client import mlflow_client

    name = f"t{uuid.uuid4().hex[:8]}"
    spec = load_spec(str(REPO / "jobs" / "tiny-lora-instruct.yaml"), [
        f"name={name}", f"base_model.path={tiny_model}", f"registry.model_name={name}", "registry.promote=null",
        "training.max_steps=30", "training.checkpoint_every=5", "training.eval_every=null", "resources.num_workers=1",
        f"dataset.source={REPO / 'jobs' / 'data' / 'tiny_instruct.jsonl'}"]).model_dump(mode="json")
    executor = RayExecutor(ServiceSettings(config=stack, db_url=f"sqlite:///{tmp_path / 'jobs.db'}"))
    job_id = f"job-{name}"
    executor.config.s3fs().pipe_file(executor.spec_uri(job_id)[len("s3://"):], json.dumps(spec).encode())
    ray_id = executor.client.submit_job(entrypoint=executor.entrypoint(job_id, "alice"),
                                        runtime_env=executor.runtime_env(), submission_id=executor.submission_id(job_id))
    prefix, run_name = run_folder(load_spec(spec), "alice")
    done = threading.Event()
    killer = threading.Thread(target=lambda: kills.append(_kill_worker_once_stored(
        executor.client, stack.ray_address, ray_id, stack.s3fs(), f"{stack.bucket}/{prefix}/{run_name}", 15, done)), daemon=True)
    kills: list[tuple[int, int]] = []
    killer.start()
    try:
        status = _wait_done(executor.client, ray_id)
    finally:
        done.set()
        killer.join(timeout=60)
    assert kills, "the worker was not killed (see the assertion in the killer thread's output)"
    log = executor.logs(ray_id)
    assert status == "SUCCEEDED", log[-3000:]
    result = parse_marked(log, "PEFTRAY_RESULT ")[-1]
    # The retry resumes from the newest checkpoint wholly in storage when the worker died, whether or not Ray
    # Train's controller had heard of it (the kill lands within a few steps of step 15's upload; how many, and so
    # which checkpoint that is, depends on the machine's load).
    stored = kills[0][1]
    assert 15 <= stored <= 30, f"newest stored checkpoint at the kill: {stored}"
    resumed = [m.value for m in mlflow_client(stack).get_metric_history(result["run_id"], "resumed_from_step")]
    assert resumed == [float(stored)], f"resumed from {resumed}; step {stored} was wholly stored at the kill"
    steps = Counter(p["step"] for p in parse_marked(log, PROGRESS) if p.get("job") == name)
    # steps up to the checkpoint ran once, so each printed once; the few after it may have run twice
    assert {s: steps[s] for s in range(1, stored + 1)} == dict.fromkeys(range(1, stored + 1), 1), \
        f"progress per step: {dict(steps)}"
    assert set(steps) == set(range(1, 31)), f"progress lines per step: {dict(steps)}"
