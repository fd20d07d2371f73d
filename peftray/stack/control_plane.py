"""`peftray service up | status | down`: the control plane (`python -m peftray.service`) as a child process
of the local stack; starting and stopping it is stack work, so it lives here, and `peftray stack down` stops it.

Started like the stack's servers (`peftray.stack.procs`): its own session, a free port on 127.0.0.1, pid and
start time recorded, the port verified to be served by our own process. `<state dir>/service.json` (mode 0600)
holds the pid, URL and admin token; `up` also publishes `service_url`/`service_token` in the stack's state
file, so `load_config()` (and so the CLI) finds the service without any environment variable.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from peftray.endpoints import load_config, read_state
from peftray.errors import StackError
from peftray.stack import procs
from peftray.stack.procs import Proc
from peftray.stack.state import locked, update_state, write_private

SERVICE_FILE = "service.json"
# What the service process must not inherit from whoever runs `service up` (a user's own token, say).
_CLIENT_ONLY = ("PEFTRAY_TOKEN", "PEFTRAY_SERVICE_URL")


@dataclass
class ServiceProc:
    """A started control-plane process."""

    proc: Proc
    url: str
    admin_token: str
    service_dir: Path

    @property
    def alive(self) -> bool:
        return procs.process_of(self.proc) is not None

    def stop(self) -> bool:
        return procs.stop(self.proc)


def read_service(service_dir: Path) -> ServiceProc | None:
    """The recorded service of a folder (alive or not), or None."""
    try:
        data = json.loads((Path(service_dir) / SERVICE_FILE).read_text())
        return ServiceProc(Proc.from_json(data["proc"]), data["url"], data["admin_token"], Path(service_dir))
    except (OSError, ValueError, KeyError):
        return None


def _healthy(url: str) -> bool:
    return httpx.get(f"{url}/healthz", timeout=2).status_code == 200


def start_service(service_dir: Path, settings_env: dict[str, str] | None = None, admin_token: str | None = None,
                  state_dir: Path | None = None, timeout: float = 60) -> ServiceProc:
    """Start `python -m peftray.service` on a free port; wait until it answers; record it in `service_dir`.

    Args:
        service_dir: where `service.json`, the log and (by default) the SQLite job store go.
        settings_env: PEFTRAY_SERVICE_* settings (see `peftray.service.settings`) for the process.
        admin_token: the admin token (default: a new random one).
        state_dir: the stack whose endpoints the service uses (default: `load_config()`'s).
    """
    service_dir = procs.private_dir(Path(service_dir).absolute())  # the job store and the admin token
    cfg = load_config(state_dir)
    token = admin_token or secrets.token_urlsafe(32)
    port = procs.free_port()
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ONLY}
    env.update({k: v for k, v in cfg.env().items() if k not in _CLIENT_ONLY})
    env.update({"PEFTRAY_SERVICE_DB_URL": f"sqlite:///{service_dir / 'service.db'}", **(settings_env or {}),
                "PEFTRAY_SERVICE_ADMIN_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"})
    cmd = [sys.executable, "-m", "peftray.service", "--host", "127.0.0.1", "--port", str(port)]
    proc = procs.start("service", cmd, service_dir / "logs" / "service.log", env, {"service": port})
    url = f"http://127.0.0.1:{port}"
    try:
        procs.wait_until(proc, lambda: _healthy(url), f"the control plane at {url}", timeout)
        if port not in procs.listening_ports(proc):
            raise StackError(f"port {port} answers, but not from the service we started (pid {proc.pid}); "
                             "run `peftray service up` again to pick another port")
    except BaseException:
        procs.stop(proc)
        raise
    svc = ServiceProc(proc, url, token, service_dir)
    write_private(service_dir / SERVICE_FILE, {"proc": proc.to_json(), "url": url, "admin_token": token})
    return svc


def _publish(state_dir: Path, url: str | None, token: str | None) -> None:
    """Write (or clear) service_url/service_token in the stack's state file (when there is one)."""

    def change(data: dict[str, Any]) -> None:
        endpoints = data.setdefault("endpoints", {})
        for key, value in (("service_url", url), ("service_token", token)):
            if value:
                endpoints[key] = value
            else:
                endpoints.pop(key, None)

    update_state(state_dir, change)


def up(state_dir: str | Path | None = None, settings_env: dict[str, str] | None = None) -> ServiceProc:
    """Start the local stack's control plane (a no-op if it runs) and publish its URL and admin token."""
    sdir = load_config(state_dir).state_dir
    if not read_state(sdir).get("procs"):
        raise StackError(f"no local stack is running in {sdir}: run `peftray stack up` first")
    with locked(sdir, ".service.lock"):
        old = read_service(sdir)
        if old and old.alive:
            return old
        svc = start_service(sdir, settings_env, admin_token=old.admin_token if old else None, state_dir=sdir)
        _publish(sdir, svc.url, svc.admin_token)
        return svc


def status(state_dir: str | Path | None = None) -> ServiceProc | None:
    return read_service(load_config(state_dir).state_dir)


def down(state_dir: str | Path | None = None) -> bool:
    """Stop the local control plane if it runs. Jobs keep running on Ray; the next `up` reconciles them."""
    sdir = load_config(state_dir).state_dir
    with locked(sdir, ".service.lock"):
        svc = read_service(sdir)
        stopped = bool(svc and svc.stop())
        _publish(sdir, None, None)
        return stopped
