"""Real tiny jobs through a real service process (job store on PostgreSQL), real Ray, MLflow and S3.

One service for the module: at most 2 jobs at once, 1 per user, so a user's second job waits in the queue.
No warm runners: these are the Ray Jobs + Ray Train path's tests (multi-worker jobs take it);
tests/service/test_warm_runners.py has the warm path's.
"""

from __future__ import annotations

import json

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from svc_helpers import launch, tiny_spec

from peftray.cli.jobs import PROGRESS
from peftray.errors import ForbiddenError, NotFoundError
from peftray.service.client import ServiceClient
from peftray.stack import procs

pytestmark = [pytest.mark.stack, pytest.mark.slow]
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def ray_service(stack, tmp_path_factory, pg_url):
    folder = tmp_path_factory.mktemp("svc-ray")
    holder = {"folder": folder, "db_url": pg_url,
              "svc": launch(stack, folder, db_url=pg_url, max_running=2, max_running_per_user=1,
                          warm_runners=0)}
    yield holder
    holder["svc"].stop()


@pytest.fixture(scope="module")
def clients(ray_service):
    svc = ray_service["svc"]
    admin = ServiceClient(svc.url, svc.admin_token)
    made = {"admin": admin, **{u: ServiceClient(svc.url, admin.create_token(u)) for u in ("alice", "bob")}}
    yield made
    for c in made.values():
        c.close()


@pytest.fixture(scope="module")
def long_job(clients, tiny_model):
    """Bob's endless job, submitted early so that it trains while alice's jobs run (the cancel test stops it)."""
    spec = tiny_spec(f"t{uuid.uuid4().hex[:8]}-long", tiny_model,
                     training={"max_steps": 100000, "checkpoint_every": 100000})
    return spec, clients["bob"].submit(spec)


def _wait(client, job_id, pred, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if pred(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached the condition; last: {job['state']} {job.get('error')}")


def _cli_submit(spec: dict, path, svc, token) -> subprocess.Popen:
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PEFTRAY_SERVICE_URL": svc.url, "PEFTRAY_TOKEN": token}
    return subprocess.Popen([sys.executable, "-m", "peftray", "submit", str(path), "--follow"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ray_client(stack):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(stack.ray_dashboard_url, headers={"Authorization": f"Bearer {stack.ray_auth_token}"})


def _train_workers(stack) -> list:
    from peftray import stack as local_stack

    head = procs.process_of(local_stack.status(stack.state_dir).procs["ray"])
    found = []
    for p in procs.tree(head):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except Exception:  # noqa: BLE001 - processes come and go
            pass
    return found


def test_cli_jobs_succeed_and_fail_one_at_a_time_per_user(stack, ray_service, clients, long_job, tiny_model,
                                                          unique_name, tmp_path):
    svc, alice = ray_service["svc"], clients["alice"]
    good = tiny_spec(f"{unique_name}-ok", tiny_model)
    bad = tiny_spec(f"{unique_name}-bad", tiny_model, dataset={"source": str(tmp_path / "no-such-data.jsonl")})
    token = alice.http.headers["authorization"].split()[1]
    ok_cli = _cli_submit(good, tmp_path / "ok.yaml", svc, token)
    ok_id = _job_id_of(alice, good["name"])  # stored before the second is sent: submit order decides queue order
    bad_cli = _cli_submit(bad, tmp_path / "bad.yaml", svc, token)
    bad_id = _job_id_of(alice, bad["name"])
    env = {**os.environ, "PEFTRAY_SERVICE_URL": svc.url, "PEFTRAY_TOKEN": token}
    logs_cli = subprocess.Popen([sys.executable, "-m", "peftray", "jobs", "logs", "-f", ok_id], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while (ok := alice.get(ok_id))["state"] not in TERMINAL:  # alice may run one job at a time
        assert alice.get(bad_id)["state"] == "queued"
        time.sleep(0.5)
    ok_out = ok_cli.communicate(timeout=240)[0]
    logs_out = logs_cli.communicate(timeout=240)[0]  # `jobs logs -f` streamed the run and ended with the job
    assert logs_cli.returncode == 0 and PROGRESS in logs_out, logs_out[-2000:]
    assert ok_cli.returncode == 0, ok_out
    assert "succeeded" in ok_out and f"version {ok['model_version']}" in ok_out
    assert [t["state"] for t in ok["transitions"]] == ["queued", "starting", "running", "succeeded"]
    assert ok["created_at"] <= ok["started_at"] <= ok["running_at"] <= ok["finished_at"]
    assert ok["progress"]["step"] == ok["progress"]["total_steps"] == 4
    _check_registered(stack, ok)
    _check_promotion(svc, clients, ok, token)
    bad_out = bad_cli.communicate(timeout=240)[0]
    assert bad_cli.returncode == 1, bad_out
    failed = alice.get(bad_id)
    assert failed["state"] == "failed" and "no-such-data.jsonl" in failed["error"]
    assert failed["model_version"] is None


def _check_promotion(svc, clients, ok: dict, token: str) -> None:
    """`peftray promote` (HTTP) by the job's owner works; another user is refused; the registry shows the alias."""
    name, version = ok["model_name"], int(ok["model_version"])
    with pytest.raises(ForbiddenError):
        clients["bob"].promote(name, version, "staging")
    env = {**os.environ, "PEFTRAY_SERVICE_URL": svc.url, "PEFTRAY_TOKEN": token}
    done = subprocess.run([sys.executable, "-m", "peftray", "promote", name, str(version), "--alias", "staging"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"{name}@staging -> version {version}" in done.stdout, done.stderr
    alice = clients["alice"]
    assert name in [a["name"] for a in alice.request("GET", "/v1/adapters")["adapters"]]
    listed = {v["version"]: v for v in alice.request("GET", f"/v1/adapters/{name}/versions")["versions"]}
    assert "staging" in listed[version]["aliases"]


def _job_id_of(client, name: str) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = client.list(name=name)["jobs"]
        if jobs:
            return jobs[0]["id"]
        time.sleep(0.3)
    raise AssertionError(f"no job named {name}")


def _check_registered(stack, job: dict) -> None:
    from mlflow.tracking import MlflowClient

    from peftray import registry

    run = MlflowClient(stack.mlflow_tracking_uri).get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    versions = {v.version: v for v in registry.list_versions(job["model_name"], stack)}
    assert versions[int(job["model_version"])].run_id == job["mlflow_run_id"]
    # the service took the result from the record the driver wrote next to the job's spec, not from its log
    record = json.loads(stack.s3fs().cat_file(f"{stack.bucket}/jobs/{job['id']}/result.json"))
    assert (record["run_id"], str(record["version"])) == (job["mlflow_run_id"], job["model_version"])


def test_cancel_running_job_stops_ray_and_registers_nothing(stack, clients, long_job):
    bob = clients["bob"]
    spec, job = long_job
    running = _wait(bob, job["id"], lambda j: j["state"] == "running" and j["progress"] or j["state"] in TERMINAL)
    assert running["state"] == "running", running
    assert _train_workers(stack), "the job's Ray Train worker should be alive while it trains"
    bob.cancel(job["id"])
    done = _wait(bob, job["id"], lambda j: j["state"] in TERMINAL, 60)
    assert done["state"] == "cancelled" and done["reason"] == "cancelled on request"
    assert str(_ray_client(stack).get_job_info(done["ray_job_id"]).status.value) == "STOPPED"
    deadline = time.monotonic() + 30
    while _train_workers(stack) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _train_workers(stack), "cancel must stop the job's workers too"
    from peftray import registry

    try:
        assert registry.list_versions(spec["name"], stack) == []
    except NotFoundError:
        pass


def test_restart_while_running_keeps_tracking(stack, ray_service, clients, tiny_model, unique_name):
    alice = clients["alice"]
    job = alice.submit(tiny_spec(f"{unique_name}-restart", tiny_model, training={"max_steps": 12}))
    _wait(alice, job["id"], lambda j: j["state"] in ("running", *TERMINAL))
    old = ray_service["svc"]
    os.kill(old.proc.pid, signal.SIGKILL)  # no graceful shutdown: as after a crash
    deadline = time.monotonic() + 10
    while procs.process_of(old.proc) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert str(_ray_client(stack).get_job_info(f"peftray-{job['id']}").status.value) in ("PENDING", "RUNNING")
    new = launch(stack, ray_service["folder"], admin_token=old.admin_token, db_url=ray_service["db_url"],
                 max_running=2, max_running_per_user=1, warm_runners=0)
    ray_service["svc"] = new
    again = ServiceClient(new.url, alice.http.headers["authorization"].split()[1])
    done = _wait(again, job["id"], lambda j: j["state"] in TERMINAL)
    assert done["state"] == "succeeded", done
    states = [t["state"] for t in done["transitions"]]
    assert states == ["queued", "starting", "running", "succeeded"]
    assert done["model_version"] and done["mlflow_run_id"]
    again.close()
