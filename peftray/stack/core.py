"""`peftray stack up | status | down`: the embedded local stack (S3, MLflow, Ray head) as child processes.

The state folder (default `.peftray/`) holds the state file with ports, pids and credentials, each
server's data and logs. Data survives `down`, so a second `up` finds the same runs, models and objects.
"""

from __future__ import annotations

import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from peftray.endpoints import Config, load_config, read_state
from peftray.errors import StackError
from peftray.stack import control_plane, procs, servers
from peftray.stack.procs import Proc
from peftray.stack.servers import Options
from peftray.stack.state import locked, update_state

ORDER = ("s3", "mlflow", "ray")
PORT_NAMES = (
    "weed_master", "weed_master_grpc", "weed_volume", "weed_volume_grpc", "weed_filer", "weed_filer_grpc",
    "s3", "s3_grpc", "mlflow", *servers.RAY_PORT_NAMES,
)


@dataclass
class StackStatus:
    state_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    alive: dict[str, bool] = field(default_factory=dict)
    endpoints: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return bool(self.procs) and all(self.alive.get(n) for n in ORDER)

    @property
    def stale(self) -> bool:
        """Recorded processes of which at least one is gone: a crashed or killed stack."""
        return bool(self.procs) and not self.running


def status(state_dir: str | Path | None = None) -> StackStatus:
    sdir = load_config(state_dir).state_dir
    data = read_state(sdir)
    st = StackStatus(state_dir=sdir, endpoints=data.get("endpoints", {}))
    for name, raw in data.get("procs", {}).items():
        proc = Proc.from_json(raw)
        st.procs[name] = proc
        st.alive[name] = procs.process_of(proc) is not None
    return st


def _credentials(old: dict, sdir: Path) -> dict[str, str]:
    """The stack's credentials: made once, then kept (the data in the state folder is tied to them).

    The state file records them once the stack is up. A start that failed part-way (MLflow made its auth
    database with the admin password, then another server did not come up: seen on busy machines) leaves no
    state file, only MLflow's `auth.ini` beside that database: its admin user is kept, or every MLflow call of
    the retried stack would get 401 (the database keeps the first password; MLflow never resets it).
    """
    ep = old.get("endpoints", {})
    fresh = {
        "aws_access_key_id": "peftray" + secrets.token_hex(6),
        "aws_secret_access_key": secrets.token_urlsafe(30),
        "mlflow_username": "peftray-admin",
        "mlflow_password": secrets.token_urlsafe(24),
    }
    kept = dict(ep)
    if not (kept.get("mlflow_username") and kept.get("mlflow_password")):
        kept.update(servers.mlflow_admin_of(sdir / "mlflow"))
    return {k: kept.get(k) or v for k, v in fresh.items()}


def _token_file(path: Path) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
            fh.write(secrets.token_hex(32))
    return path


def _choose_ports(opts: Options) -> dict[str, int]:
    ports = dict(opts.ports or {})
    missing = [n for n in PORT_NAMES if n not in ports]
    for name, port in zip(missing, procs.free_ports(len(missing) + 8)):
        ports[name] = port
    procs.check_ports_free(ports)
    return ports


def _verify_ownership(started: dict[str, Proc], must_listen: dict[str, list[int]], timeout: float = 30.0) -> None:
    """Each port we hand out must be served by our own process tree, not by whoever got there first.

    Looked at again for a while before giving up: on a busy machine a scan of a process's sockets can miss one
    while the process forks (Ray's dashboard starts its modules then), which is no proof of a foreign owner.
    """
    deadline = time.monotonic() + timeout
    while True:
        for name in must_listen:
            if procs.process_of(started[name]) is None:  # e.g. `ray start` timed out, leaving its servers behind
                raise StackError(f"{name} exited during start-up. Last lines of {started[name].log}:\n"
                                 f"{procs.log_tail(started[name])}")
        foreign = {name: [p for p in ports if p not in procs.listening_ports(started[name])]
                   for name, ports in must_listen.items()}
        name = next((n for n, ports in foreign.items() if ports), None)
        if name is None:
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"{name}: port(s) {foreign[name]} answer, but not from the process we started "
                f"(pid {started[name].pid}). Another program took them; run `peftray stack up` again to pick new "
                "ports."
            )
        time.sleep(0.5)


def up(opts: Options, progress: Callable[[str], None] = lambda msg: None) -> StackStatus:
    """Start the stack (or do nothing if ours is already running) and return its status once healthy."""
    sdir = opts.state_dir = Path(opts.state_dir).absolute()
    with locked(sdir):
        st = status(sdir)
        if st.running:
            progress(f"stack already running (state in {sdir})")
            return st
        if st.stale:
            progress("found a stack from an earlier run that is no longer whole; stopping what is left of it")
            _stop_all(st)
        # The folder holds the credentials, MLflow's databases and every S3 object (SeaweedFS's volumes): only
        # its owner may read it, also when an older stack wrote it world-readable.
        procs.make_private(sdir)
        old = read_state(sdir)
        creds = _credentials(old, sdir)
        token_path = _token_file(sdir / "ray_auth_token")
        bucket = old.get("endpoints", {}).get("bucket", "peftray")
        ports = _choose_ports(opts)
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        mlflow_url = f"http://127.0.0.1:{ports['mlflow']}"
        dashboard = f"http://127.0.0.1:{ports['ray_dashboard']}"
        # Jobs on the Ray head reach S3 and MLflow without being told (the service adds them explicitly too).
        ray_env = {"MLFLOW_S3_ENDPOINT_URL": endpoint, "MLFLOW_TRACKING_URI": mlflow_url,
                   "AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
                   "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"],
                   "MLFLOW_TRACKING_USERNAME": creds["mlflow_username"],
                   "MLFLOW_TRACKING_PASSWORD": creds["mlflow_password"], "AWS_DEFAULT_REGION": "us-east-1"}
        started: dict[str, Proc] = {}
        t0 = time.monotonic()
        try:
            progress("starting object storage (SeaweedFS S3), MLflow and the Ray head")
            started["s3"] = servers.start_weed(opts, creds, ports)
            started["mlflow"] = servers.start_mlflow(opts, endpoint, creds, bucket, ports["mlflow"])
            started["ray"] = servers.start_ray(opts, {k: ports[k] for k in servers.RAY_PORT_NAMES}, token_path, ray_env)
            pool = ThreadPoolExecutor(3)
            try:
                futures = [
                    pool.submit(servers.wait_weed, started["s3"], endpoint, creds, bucket),
                    pool.submit(servers.wait_mlflow, started["mlflow"], mlflow_url),
                    pool.submit(servers.wait_ray, started["ray"], dashboard, token_path),
                ]
                # The first failure is raised at once (a dead Ray head is not reported only after MLflow's long
                # wait); the other waits end when the except below stops their servers.
                for fut in as_completed(futures):
                    fut.result()
            finally:
                pool.shutdown(wait=False)
            _verify_ownership(started, {"s3": [ports["s3"]], "mlflow": [ports["mlflow"]],
                                        "ray": [ports["ray_gcs"], ports["ray_dashboard"]]})
        except BaseException:
            for proc in started.values():
                procs.stop(proc)
            raise
        endpoints = {
            "s3_endpoint_url": endpoint, **creds, "bucket": bucket,
            "mlflow_tracking_uri": mlflow_url,
            "ray_address": f"127.0.0.1:{ports['ray_gcs']}",
            "ray_dashboard_url": dashboard,
            "ray_auth_token_path": str(token_path),
        }
        fresh = {
            "endpoints": endpoints,
            "procs": {n: p.to_json() for n, p in started.items()},
            "options": {"db_url": opts.db_url, "ray_num_cpus": opts.ray_num_cpus},
            "started_at": time.time(),
            "startup_seconds": round(time.monotonic() - t0, 1),
        }
        update_state(sdir, lambda data: (data.clear(), data.update(fresh)), create=True)
        progress(f"stack up in {time.monotonic() - t0:.1f}s")
        return status(sdir)


def _stop_all(st: StackStatus) -> list[str]:
    # In parallel: each server's graceful shutdown waits on its own, and none depends on another's.
    names = [n for n in reversed(ORDER) if n in st.procs]
    with ThreadPoolExecutor(max(1, len(names))) as pool:
        results = list(pool.map(lambda n: procs.stop(st.procs[n]), names))
    return [n for n, was_running in zip(names, results) if was_running]


def down(state_dir: str | Path | None = None) -> list[str]:
    """Stop exactly the processes this stack started, the control plane first (it runs on this stack, and
    should not see its Ray head vanish). Returns the names of those that were running ("service", ...)."""
    sdir = load_config(state_dir).state_dir
    stopped = ["service"] if control_plane.down(sdir) else []
    with locked(sdir):
        stopped += _stop_all(status(sdir))
        update_state(sdir, lambda data: data.update(procs={}))
        return stopped


def config(state_dir: str | Path | None = None) -> Config:
    """The client config for this stack (environment variables still override)."""
    return load_config(state_dir)
