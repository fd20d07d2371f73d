"""Warm runners (`peftray.service.warm_pool`) on the real stack: one-worker CPU jobs run in runner processes
started ahead of time, each with its own MLflow run, checkpoints, log and registered version; a runner works
for one owner only; cancelling one job leaves the others running; a runner killed from outside resumes its
job elsewhere from the newest checkpoint."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid

import pytest
from svc_helpers import launch, tiny_spec

from peftray.service.client import ServiceClient

pytestmark = [pytest.mark.stack, pytest.mark.slow]
PID = re.compile(r"runs in warm runner pid (\d+)")


SETTINGS = {"max_running": 3, "max_running_per_user": 2, "warm_runners": 2}


@pytest.fixture(scope="module")
def warm(stack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("svc-warm")
    svc = launch(stack, folder, db_url=f"sqlite:///{folder}/jobs.db", **SETTINGS)
    admin = ServiceClient(svc.url, svc.admin_token)
    users = {u: ServiceClient(svc.url, admin.create_token(u)) for u in ("alice", "bob")}
    holder = [svc, admin, users, folder]
    yield holder
    for c in (holder[1], *holder[2].values()):
        c.close()
    holder[0].stop()


def _wait(client, job_id, pred, what, timeout=300):
    deadline = time.monotonic() + timeout
    job = client.get(job_id)
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if pred(job):
            return job
        time.sleep(0.2)  # polling the job's state (a condition), not waiting a fixed time
    raise AssertionError(f"job {job_id} never {what}; last: {job['state']} {job.get('error')}")


def _ended(job) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def _runner_pid(client, job_id) -> int:
    found = PID.search("".join(client.logs(job_id)))
    assert found, f"job {job_id}'s log does not name its runner"
    return int(found.group(1))


def _name(tag: str) -> str:
    return f"w{uuid.uuid4().hex[:6]}-{tag}"


def test_a_job_runs_on_a_warm_runner_and_registers_with_its_own_run(warm, tiny_model, stack):
    svc, admin, users, _ = warm
    alice = users["alice"]
    spec = tiny_spec(_name("a1"), tiny_model, training={"checkpoint_every": 2})
    first = alice.submit(spec)
    done = _wait(alice, first["id"], _ended, "ended")
    assert done["state"] == "succeeded", done.get("error")
    assert done["ray_job_id"] == f"warm-{first['id']}"
    assert done["model_version"] == "1" and done["mlflow_run_id"]
    log = "".join(alice.logs(first["id"]))
    assert log.count('PEFTRAY_PROGRESS {"job"') == 4, log[-3000:]  # every step once, in this job's log only
    assert "PEFTRAY_RESULT" in log
    progress = [e for e in alice.events(first["id"]) if e["kind"] == "progress"]
    assert progress and progress[-1]["data"]["step"] == 4

    from peftray.registry.client import mlflow_client

    run = mlflow_client(stack).get_run(done["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags.get("peftray.job_id") == first["id"]
    assert "loss" in run.data.metrics and "eval_loss" in run.data.metrics

    # the checkpoints sit where a Ray Train run of the same spec would look for them: the newest two kept
    fs = stack.s3fs()
    fs.invalidate_cache()
    root = f"{stack.bucket}/train/alice"
    runs = [p for p in fs.ls(root) if p.rsplit("/", 1)[-1].startswith(spec["name"] + "-")]
    assert len(runs) == 1, fs.ls(root)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(runs[0])) == ["checkpoint_000002", "checkpoint_000004"]

    # alice's next job reuses her runner (no new process); bob's never runs in it
    second = alice.submit(tiny_spec(_name("a2"), tiny_model))
    other = users["bob"].submit(tiny_spec(_name("b1"), tiny_model))
    for client, job in ((alice, second), (users["bob"], other)):
        ended = _wait(client, job["id"], _ended, "ended")
        assert ended["state"] == "succeeded", ended.get("error")
    assert _runner_pid(alice, second["id"]) == _runner_pid(alice, first["id"])
    # ... and trains the same numbers there as a fresh process did (the spec differs only in name and checkpoints)
    again = alice.get(second["id"])
    assert again["metrics"]["loss"] == pytest.approx(done["metrics"]["loss"], abs=1e-6)
    assert again["metrics"]["eval_loss"] == pytest.approx(done["metrics"]["eval_loss"], abs=1e-6)
    assert _runner_pid(users["bob"], other["id"]) != _runner_pid(alice, first["id"])


def test_cancelling_one_job_leaves_the_others_running(warm, tiny_model):
    svc, admin, users, _ = warm
    alice, bob = users["alice"], users["bob"]
    endless = alice.submit(tiny_spec(_name("long"), tiny_model, training={"max_steps": 100000,
                                                                          "checkpoint_every": 100000}))
    queued = alice.submit(tiny_spec(_name("after"), tiny_model))  # alice's second: may queue on her runner
    beside = bob.submit(tiny_spec(_name("beside"), tiny_model, training={"max_steps": 30}))
    _wait(alice, endless["id"], lambda j: (j.get("progress") or {}).get("step", 0) >= 2, "trained 2 steps")
    alice.cancel(endless["id"])
    gone = _wait(alice, endless["id"], _ended, "ended", timeout=120)
    assert gone["state"] == "cancelled"
    for client, job in ((alice, queued), (bob, beside)):
        ended = _wait(client, job["id"], _ended, "ended")
        assert ended["state"] == "succeeded", ended.get("error")


def test_a_runner_killed_from_outside_resumes_its_job_from_the_newest_checkpoint(warm, tiny_model):
    svc, admin, users, _ = warm
    bob = users["bob"]
    job = bob.submit(tiny_spec(_name("kill"), tiny_model, training={"max_steps": 300, "checkpoint_every": 5,
                                                                    "max_failures": 1}))
    _wait(bob, job["id"], lambda j: (j.get("progress") or {}).get("step", 0) >= 12, "trained 12 steps")
    pid = _runner_pid(bob, job["id"])
    os.kill(pid, signal.SIGKILL)  # as an out-of-memory kill would
    done = _wait(bob, job["id"], _ended, "ended")
    assert done["state"] == "succeeded", done.get("error")
    log = "".join(bob.logs(job["id"]))
    resumed = re.search(r"from the checkpoint after step (\d+)", log)
    assert resumed and int(resumed.group(1)) >= 10, log[-3000:]
    assert _runner_pid(bob, job["id"]) != pid


def test_a_failing_job_fails_with_its_reason_and_retires_its_runner(warm, tiny_model, tmp_path):
    svc, admin, users, _ = warm
    bob = users["bob"]
    broken = tmp_path.parent / f"broken-{uuid.uuid4().hex[:6]}.jsonl"
    broken.write_text('{"question": "a", "answer": "b"}\n' * 8)  # not the columns the spec names
    job = bob.submit(tiny_spec(_name("bad"), tiny_model, dataset={"source": str(broken)}))
    done = _wait(bob, job["id"], _ended, "ended")
    assert done["state"] == "failed" and done["model_version"] is None
    assert "`dataset.prompt_field`" in done["error"] and "question, answer" in done["error"], done["error"]
    # what a failed job left in its process is not the next job's: bob's next job runs in another process
    after = bob.submit(tiny_spec(_name("next"), tiny_model))
    assert _wait(bob, after["id"], _ended, "ended")["state"] == "succeeded"
    assert _runner_pid(bob, after["id"]) != _runner_pid(bob, job["id"])


def test_a_service_restarted_while_a_warm_job_runs_finds_it_and_records_its_end(warm, tiny_model, stack):
    from peftray.stack import procs

    old, admin, users, folder = warm
    alice = users["alice"]
    job = alice.submit(tiny_spec(_name("restart"), tiny_model, training={"max_steps": 300}))
    _wait(alice, job["id"], lambda j: (j.get("progress") or {}).get("step", 0) >= 1, "trained a step")
    os.kill(old.proc.pid, signal.SIGKILL)  # no graceful shutdown: as after a crash
    deadline = time.monotonic() + 10
    while procs.process_of(old.proc) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    new = launch(stack, folder, admin_token=old.admin_token, db_url=f"sqlite:///{folder}/jobs.db", **SETTINGS)
    warm[0] = new
    for c in (admin, *users.values()):
        c.close()
    warm[1] = ServiceClient(new.url, old.admin_token)
    warm[2] = {u: ServiceClient(new.url, c.http.headers["authorization"].split()[1]) for u, c in users.items()}
    again = warm[2]["alice"]
    done = _wait(again, job["id"], _ended, "ended")
    assert done["state"] == "succeeded", done.get("error")
    assert [t["state"] for t in done["transitions"]] == ["queued", "starting", "running", "succeeded"]
    assert 'PEFTRAY_PROGRESS {"job"' in "".join(again.logs(job["id"]))  # the runner's log, after the restart
