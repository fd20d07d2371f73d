"""A real multi-node Ray cluster on one machine, for the cluster tests.

The head comes from `peftray.stack.up` (with S3 and MLflow); extra nodes are `ray start --address=... --block`
child processes with their own ports, temp dir, CPUs and a custom resource, tracked by pid through
`peftray.stack.procs` so a test can kill exactly one node (its whole process tree) and nothing else.
Every Ray driver runs in a subprocess: a driver attached to a node that dies is taken down with it, and
this pytest process must survive the head's death.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from peftray.config import Config
from peftray.stack import procs, servers
from peftray.stack.procs import Proc

NODE_PORTS = ("node_manager", "object_manager", "metrics", "agent_http", "agent_grpc", "runtime_env_agent")
HERE = Path(__file__).parent


@dataclass
class Node:
    name: str
    proc: Proc
    temp_dir: Path

    def stop(self) -> None:
        """Stop the node's whole process tree (if still running) and remove its temp dir."""
        procs.stop(self.proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_node(cfg: Config, name: str, num_cpus: int, resources: dict[str, float], tmp: Path,
               env_extra: dict[str, str] | None = None) -> Node:
    """Start a worker node that joins the cluster at `cfg.ray_address`, with the cluster's token."""
    ports = dict(zip(NODE_PORTS, procs.free_ports(len(NODE_PORTS))))
    # Ray keeps unix sockets under the temp dir; their paths must stay short.
    temp_dir = Path(f"/tmp/peftray-{name}-{os.getpid()}-{ports['node_manager']}")
    env = servers._child_env({**cfg.env(), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                              **(env_extra or {})})
    cmd = [
        servers._bin("ray"), "start", "--block", "--disable-usage-stats", f"--address={cfg.ray_address}",
        "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
        f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
        f"--metrics-export-port={ports['metrics']}", f"--dashboard-agent-listen-port={ports['agent_http']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        f"--object-store-memory={256 * 1024 * 1024}", f"--temp-dir={temp_dir}",
    ]
    return Node(name, procs.start(name, cmd, tmp / "logs" / f"{name}.log", env, ports), temp_dir)


class Driver:
    """`tests/cluster/<script>` running as a Ray driver in its own process, output in files."""

    def __init__(self, cfg: Config, script: str, args: list[str], log_dir: Path, env_extra: dict | None = None):
        env = {**os.environ, **cfg.env(), "RAY_AUTH_MODE": "token", "RAY_ADDRESS": cfg.ray_address,
               **(env_extra or {})}
        self.out, self.err = log_dir / f"{script}.out", log_dir / f"{script}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen([sys.executable, str(HERE / script), *args], env=env, stdout=out,
                                          stderr=err, stdin=subprocess.DEVNULL)

    def output(self) -> str:
        return f"stdout:\n{self.out.read_text()[-3000:]}\nstderr:\n{self.err.read_text()[-6000:]}"

    def result(self, timeout: float) -> dict:
        """Wait for the driver; its last JSON line, or an AssertionError with its output."""
        try:
            rc = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"driver still running after {timeout:.0f}s\n{self.output()}") from None
        lines = [ln for ln in self.out.read_text().splitlines() if ln.startswith("{")]
        if rc != 0 or not lines:
            raise AssertionError(f"driver failed (rc={rc})\n{self.output()}")
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


def wait_for(check, what: str, timeout: float = 60.0, every: float = 0.5, context=lambda: ""):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the thing we wait for is still coming up
            last_exc = exc
        time.sleep(every)
    raise AssertionError(f"{what} not reached after {timeout:.0f}s (last error: {last_exc!r})\n{context()}")


def alive_nodes(cfg: Config) -> list[dict]:
    """Alive nodes as the GCS sees them, asked over the dashboard's HTTP API with the token."""
    import urllib.request

    req = urllib.request.Request(f"{cfg.ray_dashboard_url}/nodes?view=summary",
                                 headers={"Authorization": f"Bearer {cfg.ray_auth_token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback
        summary = json.loads(resp.read())["data"]["summary"]
    return [n["raylet"] for n in summary if n["raylet"]["state"] == "ALIVE"]


def crash(proc: Proc) -> None:
    """SIGKILL a process and all its descendants at once: a machine failure, not a shutdown."""
    root = procs.process_of(proc)
    if root is None:
        return
    victims = procs.tree(root)
    for p in victims:
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    import psutil

    psutil.wait_procs(victims, timeout=10)


def restart_head(opts, cfg: Config, old: Proc) -> Proc:
    """Start the stack's Ray head again on the same ports (workers reconnect to the same GCS address)."""
    proc = servers.start_ray(opts, old.ports, Path(cfg.ray_auth_token_path), cfg.env())
    servers.wait_ray(proc, cfg.ray_dashboard_url, Path(cfg.ray_auth_token_path))
    return proc
