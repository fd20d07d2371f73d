"""Head-node failure with GCS fault tolerance on an external Redis: serving continues, the head comes back."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from peftray.stack import procs
from conftest import start_head
from ray_nodes import Driver, alive_nodes, crash, start_node, wait_for, wait_node_gone

OUTAGE_SECONDS = 8


def _ask(url: str, timeout: float = 3) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


class Prober(threading.Thread):
    """Sends a request every 0.2 s and records (time, answer or error). A request may take up to 60 s: on a busy
    2-core machine an answer can be slow, and a slow answer is still an answer (latency belongs in a benchmark)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.log, self.halt = url, [], threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t = time.monotonic()
            try:
                self.log.append((t, _ask(self.url, timeout=60)))
            except Exception as exc:  # noqa: BLE001 - recorded, the test judges it
                self.log.append((t, repr(exc)))
            self.halt.wait(0.2)

    def between(self, t0: float, t1: float) -> list:
        return [a for t, a in self.log if t0 <= t <= t1]


@pytest.mark.slow
def test_serving_survives_head_failure_and_head_recovers(ft_cluster, tmp_path):
    cfg = ft_cluster.cfg
    http_port, worker_proxy_port = procs.free_ports(2)
    # Reconnect window longer than a head restart takes on a busy 2-core machine.
    slow_gcs = {"RAY_gcs_rpc_server_reconnect_timeout_s": "300"}
    node_c = start_node(cfg, "node-c", num_cpus=1, resources={"node_c": 1}, tmp=tmp_path,
                        env_extra={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(worker_proxy_port), **slow_gcs})
    url = f"http://127.0.0.1:{worker_proxy_port}/"
    prober = None
    try:
        node_c_id = node_c.node_id
        deployed = Driver(cfg, ["driver_serve.py", "deploy", str(http_port)], tmp_path).result(timeout=180)
        assert deployed == {"echo": "RUNNING"}
        before = wait_for(lambda: _ask(url), "the worker node's proxy answering", timeout=60)
        assert before["node_id"] == node_c_id
        prober = Prober(url)
        prober.start()

        crash(ft_cluster.head)  # SIGKILL: GCS, head raylet, dashboard, Serve controller and head proxy all gone
        t_down = time.monotonic()
        with pytest.raises(Exception):
            _ask(f"http://127.0.0.1:{http_port}/")  # the head's proxy is really gone
        # The outage lasts until the head has been gone OUTAGE_SECONDS and at least 5 requests were answered or
        # failed meanwhile (however slowly the busy machine runs them).
        wait_for(lambda: time.monotonic() - t_down >= OUTAGE_SECONDS and len(prober.between(t_down, 1e18)) >= 5,
                 "requests sent during the head outage", timeout=300)
        during = prober.between(t_down, time.monotonic())
        # Same ports, same Redis namespace: node C's raylet finds the GCS where it was.
        ft_cluster.head = start_head(ft_cluster.opts, ft_cluster.head.ports, cfg)
        t_up = time.monotonic()

        assert len(during) >= 5, f"too few requests during the outage: {during}"
        assert all(a == before for a in during), f"requests failed or moved during the outage: {during}"
        # The cluster heals: node C reconnects to the restarted GCS (same node id), the controller
        # restarts on the new head and reports the app from its state in Redis.
        wait_for(lambda: node_c_id in {n["nodeId"] for n in alive_nodes(cfg)} and len(alive_nodes(cfg)) == 2,
                 "node C reconnecting to the restarted head", timeout=120)
        # The restarted controller reconciles first (DEPLOYING for a moment on a busy machine), then RUNNING.
        seen = []

        def running() -> bool:
            seen.append(Driver(cfg, ["driver_serve.py", "status"], tmp_path).result(timeout=120))
            return seen[-1] == {"echo": "RUNNING"}

        wait_for(running, "the Serve app RUNNING again after the head restart", timeout=120, every=2,
                 context=lambda: f"statuses seen: {seen}")
        wait_for(lambda: len(prober.between(t_up, 1e18)) >= 3, "requests after the head came back", timeout=300)
        after = prober.between(t_up, time.monotonic())
        assert after and all(a == before for a in after), after  # the same replica process throughout
        print(f"requests answered during a {time.monotonic() - t_down:.0f}s head outage+recovery: "
              f"{len(prober.between(t_down, time.monotonic()))}")
    finally:
        if prober:
            prober.halt.set()
        node_c.stop()
        # The next test on this cluster must not find node C still listed as alive.
        if getattr(node_c, "node_id", None):
            try:
                wait_node_gone(cfg, node_c.node_id)
            except Exception:  # noqa: BLE001 - the head may be down if the test failed mid-way
                pass
