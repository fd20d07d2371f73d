"""A real multi-node Ray cluster on one machine, for the cluster tests.

The head comes from `peftray.stack.servers.start_ray` (see conftest.py); extra nodes are `ray start --address=... --block`
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

import psutil

from peftray.endpoints import Config
from peftray.stack import procs, servers
from peftray.stack.procs import Proc

NODE_PORTS = ("node_manager", "object_manager", "metrics", "agent_http", "agent_grpc", "runtime_env_agent")
HERE = Path(__file__).parent


@dataclass
class Node:
    name: str
    proc: Proc
    temp_dir: Path
    node_id: str = ""

    def stop(self) -> None:
        """Stop the node's whole process tree (if still running) and remove its temp dir.

        A `ray start` that gave up leaves its raylet behind, re-parented: it is still in the process group
        `ray start` led (start_new_session), so the group's members that run under this node's temp dir die too.
        """
        procs.stop(self.proc)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(p.pid) == self.proc.pid and str(self.temp_dir) in " ".join(p.info["cmdline"] or []):
                    p.kill()
            except (OSError, psutil.Error):
                continue
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _start_node(cfg: Config, name: str, num_cpus: int, resources: dict[str, float], tmp: Path,
               env_extra: dict[str, str] | None = None) -> Node:
    """Start a worker node that joins the cluster at `cfg.ray_address`, with the cluster's token."""
    ports = dict(zip(NODE_PORTS, procs.free_ports(len(NODE_PORTS))))
    # Ray keeps unix sockets under the temp dir; their paths must stay short.
    temp_dir = Path(f"/tmp/peftray-{name}-{os.getpid()}-{ports['node_manager']}")
    env = servers._child_env({**cfg.env(), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                              # joining a head refuses to run with Ray's single-machine switch on
                              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
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


def start_node(cfg: Config, name: str, num_cpus: int, resources: dict[str, float], tmp: Path,
               env_extra: dict[str, str] | None = None, attempts: int = 3) -> Node:
    """Start a worker node and wait until the GCS lists it alive; returns it with `node.node_id` set.

    `ray start` gives its raylet a fixed 30 s to register; on a saturated 2-core machine that is sometimes
    not enough, so a node whose `ray start` gave up is started again (up to `attempts` times).
    """
    for attempt in range(attempts):
        node = _start_node(cfg, name, num_cpus, resources, tmp, env_extra)
        try:
            if _wait_registered(cfg, node):
                return node
        except BaseException:
            node.stop()
            raise
        node.stop()
    raise AssertionError(f"{name} did not join the cluster in {attempts} attempts:\n{procs.log_tail(node.proc, 30)}")


def _wait_registered(cfg: Config, node: Node, timeout: float = 120) -> bool:
    """Wait until the GCS lists the node (matched by its node manager port); False if `ray start` gave up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and procs.process_of(node.proc) is not None:
        try:
            mine = [n["nodeId"] for n in alive_nodes(cfg) if int(n["nodeManagerPort"]) == node.proc.ports["node_manager"]]
        except OSError:  # the dashboard is slow to answer on a saturated machine: ask again
            mine = []
        if mine:
            node.node_id = mine[0]
            return True
        time.sleep(0.5)
    return False


class Driver:
    """`python ARGV...` running as a Ray driver of the cluster in its own process, output in files.

    A first argument ending in `.py` names a script next to this file.
    """

    def __init__(self, cfg: Config, argv: list[str], log_dir: Path, env_extra: dict | None = None):
        env = {**os.environ, **cfg.env(), "RAY_AUTH_MODE": "token", "RAY_ADDRESS": cfg.ray_address,
               # a multi-node head binds the machine's address: so do its drivers (see conftest.ft_cluster)
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
               **(env_extra or {})}
        if argv[0].endswith(".py"):
            argv = [str(HERE / argv[0]), *argv[1:]]
        tag = f"driver-{time.monotonic_ns()}"
        self.out, self.err = log_dir / f"{tag}.out", log_dir / f"{tag}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen([sys.executable, *argv], env=env, stdout=out,
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
        # Our scripts print a JSON line; `python -m peftray.train` prints `PEFTRAY_RESULT {json}`.
        lines = [ln.removeprefix("PEFTRAY_RESULT ") for ln in self.out.read_text().splitlines()
                 if ln.startswith(("{", "PEFTRAY_RESULT {"))]
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


def dashboard_get(cfg: Config, path: str) -> dict:
    """GET a dashboard API path with the cluster's token."""
    import urllib.request

    req = urllib.request.Request(f"{cfg.ray_dashboard_url}{path}",
                                 headers={"Authorization": f"Bearer {cfg.ray_auth_token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def alive_nodes(cfg: Config) -> list[dict]:
    """Alive nodes as the GCS sees them."""
    summary = dashboard_get(cfg, "/nodes?view=summary")["data"]["summary"]
    return [n["raylet"] for n in summary if n["raylet"]["state"] == "ALIVE"]


def head_node_id(cfg: Config) -> str:
    """The alive head node's id (after a head restart the old head's id is dead and a new one is alive)."""
    heads = [n["nodeId"] for n in alive_nodes(cfg) if n.get("isHeadNode")]
    assert len(heads) == 1, f"expected one alive head node, found {heads}"
    return heads[0]


def wait_node_gone(cfg: Config, node_id: str, timeout: float = 90) -> None:
    """Wait until the GCS no longer lists a stopped node as alive (its health checks must fail first)."""
    deadline = time.monotonic() + timeout
    while node_id in {n["nodeId"] for n in alive_nodes(cfg)} and time.monotonic() < deadline:
        time.sleep(1)


def actors_of_class(cfg: Config, class_name: str) -> list[dict]:
    """Every actor of a class, alive or dead, with its node id (Ray's state API)."""
    data = dashboard_get(cfg, f"/api/v0/actors?limit=10000&detail=1&filter_keys=class_name"
                              f"&filter_predicates=%3D&filter_values={class_name}")
    return data["data"]["result"]["result"]


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
    psutil.wait_procs(victims, timeout=10)
