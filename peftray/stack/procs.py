"""Child processes of the local stack: start, recognise, wait for, and stop exactly our own.

A pid alone is not proof: after a crash the OS may give it to someone else's process. We record the pid
with its start time and only ever signal a process whose (pid, create_time) pair matches the record.
A port is not proof either: before trusting one we check that our process tree is the one listening on it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import psutil

from peftray.errors import StackError


@dataclass
class Proc:
    """A started server process as the state file records it."""

    name: str
    pid: int
    create_time: float
    log: str
    ports: dict[str, int]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Proc":
        return cls(**{k: data[k] for k in ("name", "pid", "create_time", "log", "ports")})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def check_ports_free(ports: dict[str, int]) -> None:
    busy = {k: v for k, v in ports.items() if not port_is_free(v)}
    if busy:
        names = ", ".join(f"{k}={v}" for k, v in busy.items())
        raise StackError(f"port(s) already in use on 127.0.0.1: {names}. Choose other ports or stop what uses them.")


def private_dir(path: Path) -> Path:
    """`path` as a folder only its owner may enter (0700), made with its parents if missing."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def make_private(root: Path) -> None:
    """Take group and other bits off everything under `root` (state written before files were made private)."""
    for path in [root, *root.rglob("*")]:
        try:
            if not path.is_symlink():
                os.chmod(path, path.stat().st_mode & 0o700)
        except OSError:
            continue  # a file a server removed meanwhile


def start(name: str, cmd: list[str], log: Path, env: dict[str, str], ports: dict[str, int]) -> Proc:
    """Start `cmd` in a new session (its own process group), output appended to `log`.

    Its umask is 077: whatever it creates (databases, volumes, Ray's session logs) is its owner's alone,
    whatever umask the user who ran `stack up` has.
    """
    private_dir(log.parent)
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        try:
            popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, close_fds=True, umask=0o077,
            )
        except FileNotFoundError as exc:
            raise StackError(f"{name}: cannot run {cmd[0]!r}: {exc.strerror}. Is the package that ships it installed?") from exc
    create_time = psutil.Process(popen.pid).create_time()
    return Proc(name=name, pid=popen.pid, create_time=create_time, log=str(log), ports=ports)


def process_of(proc: Proc) -> psutil.Process | None:
    """The live process this record names, or None if it is gone (or the pid now belongs to another)."""
    try:
        p = psutil.Process(proc.pid)
        if abs(p.create_time() - proc.create_time) > 1.0 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.Error:
        return None


def tree(p: psutil.Process) -> list[psutil.Process]:
    try:
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return [p]


def listening_ports(proc: Proc) -> set[int]:
    """TCP ports on which our process or one of its descendants listens."""
    p = process_of(proc)
    if p is None:
        return set()
    ports: set[int] = set()
    for q in tree(p):
        try:
            for c in q.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    ports.add(c.laddr.port)
        except psutil.Error:
            continue
    return ports


def log_tail(proc: Proc, lines: int = 15) -> str:
    try:
        text = Path(proc.log).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def wait_until(proc: Proc, check: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll `check` until it is true; fail fast (with the log's tail) if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if process_of(proc) is None:
            raise StackError(f"{proc.name} exited while waiting for {what}. Last lines of {proc.log}:\n{log_tail(proc)}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - a server still starting answers in many ways
            pass
        if time.monotonic() > deadline:
            raise StackError(f"{proc.name}: {what} not ready after {timeout:.0f}s. Last lines of {proc.log}:\n{log_tail(proc)}")
        time.sleep(0.3)


def _kill_group_of_dead_leader(proc: Proc) -> None:
    """A server that died unreaped (a zombie child of ours) can leave its process group running: `ray start` that
    timed out on a busy machine leaves its GCS and dashboard behind. Its pid cannot be reused while it is a zombie,
    so its group is still ours to kill."""
    try:
        p = psutil.Process(proc.pid)
        ours = p.status() == psutil.STATUS_ZOMBIE and abs(p.create_time() - proc.create_time) <= 1.0
    except psutil.Error:
        return
    if ours:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass


def stop(proc: Proc, timeout: float = 8.0) -> bool:
    """Stop our process and every descendant it has: SIGTERM, then SIGKILL what remains. True if it was running."""
    p = process_of(proc)
    if p is None:
        _kill_group_of_dead_leader(proc)
        return False
    victims = tree(p)
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # start_new_session made pid the group id
    except OSError:
        pass
    for q in victims:
        try:
            q.terminate()
        except psutil.Error:
            pass
    gone, alive = psutil.wait_procs(victims, timeout=timeout)
    # Children may have spawned more children while shutting down: collect those too.
    stragglers = {q.pid: q for v in alive for q in tree(v)}
    for q in stragglers.values():
        try:
            q.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(stragglers.values()), timeout=5)
    return True
