"""The warm runner's bookkeeping (`peftray.train.warm.RunnerCore`) in a plain process: one owner per runner,
a job queued there cancelled at once, a failed job ending the runner's intake."""

from __future__ import annotations

from peftray.train.warm import FAILED, PENDING, STOPPED, RunnerCore


def test_a_runner_works_for_the_owner_of_its_first_job_only():
    core = RunnerCore(capture=False)
    assert core.accept("j1", "alice")
    assert not core.accept("j2", "bob")  # another user's job never runs in alice's process
    assert core.status("j2") is None
    assert core.run("j3", "/nowhere.yaml", "s3://b/r.json", "bob", False, "b") == FAILED  # refused, not run
    assert core.status("j3") is None and core.load()["owner"] == "alice"


def test_a_job_cancelled_while_queued_stops_at_once_and_never_runs(tmp_path):
    core = RunnerCore(capture=False)
    assert core.accept("queued", "alice") and core.status("queued")["state"] == PENDING
    assert core.load()["busy"] == 1
    assert core.cancel("queued") == PENDING
    assert core.status("queued") == {"state": STOPPED, "message": "cancelled on request before it started"}
    assert core.load()["busy"] == 0 and not core.load()["spent"]
    # when its turn comes it is skipped: no spec is read (this one does not exist), the runner stays usable
    assert core.run("queued", str(tmp_path / "missing.yaml"), "s3://b/r.json", "alice", False, "b") == STOPPED
    assert core.accept("next", "alice")


def test_a_failed_job_ends_the_runners_intake_with_its_reason(tmp_path):
    core = RunnerCore(capture=False)
    assert core.accept("bad", "alice")
    state = core.run("bad", str(tmp_path / "missing.yaml"), "s3://b/r.json", "alice", False, "b")
    assert state == FAILED
    status = core.status("bad")
    assert status["state"] == FAILED and "missing.yaml" in status["message"]
    assert core.load()["spent"] and core.load()["busy"] == 0
    assert not core.accept("after", "alice")  # a fresh runner takes the next job
    assert core.cancel("unknown") is None
