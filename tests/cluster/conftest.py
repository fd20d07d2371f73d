"""A Ray cluster of our own next to the session stack: its head is killed and restarted by these tests.

The head is started by the stack's own code (`peftray.stack.servers.start_ray`) with its own token, ports and
temp dir, and GCS fault tolerance on the machine's Redis (127.0.0.1:6379) under a namespace of our own whose
keys are deleted at the end. S3 and MLflow are the session stack's: shared services, as on a real cluster.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from peftray.endpoints import Config
from peftray.errors import StackError
from peftray.stack import procs, servers
from peftray.stack.procs import Proc

REDIS_ADDRESS = os.environ.get("PEFTRAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0").split("//", 1)[1].split("/")[0]


@dataclass
class FtCluster:
    opts: servers.Options
    cfg: Config  # the session stack's S3 + MLflow, this cluster's Ray address, dashboard and token
    head: Proc  # replaced when a test restarts the head


def start_head(opts: servers.Options, ports: dict[str, int], cfg: Config, attempts: int = 3) -> Proc:
    """Start (or restart, on the same ports) the cluster's head and wait for its dashboard.

    `ray start` gives its raylet a fixed 30 s to register with the GCS, then exits ("The current node timed out
    during startup"). A restart that replays the GCS from Redis ran out of it on this 2-core machine beside a
    CPU hog and two other stacks starting: such a start is stopped and tried again, as a supervisor (KubeRay,
    systemd) restarts a head whose start failed. Any other failure is raised at once.
    """
    for attempt in range(1, attempts + 1):
        # A crashed head leaves this file behind; with it, `ray start --head` takes the surviving worker raylets
        # (whose command lines name the GCS address) for a running head and refuses to start. A replacement
        # head pod or VM starts with a fresh disk, so removing it is what a real restart looks like.
        (servers.ray_temp_dir(opts.state_dir) / "ray_current_cluster").unlink(missing_ok=True)
        head = servers.start_ray(opts, ports, Path(cfg.ray_auth_token_path), cfg.env())
        try:
            servers.wait_ray(head, cfg.ray_dashboard_url, Path(cfg.ray_auth_token_path))
            return head
        except StackError:
            timed_out = procs.process_of(head) is None and "timed out during startup" in procs.log_tail(head, 40)
            procs.stop(head)  # with what a timed-out `ray start` leaves behind (its GCS, dashboard)
            if not timed_out or attempt == attempts:
                raise


@pytest.fixture(scope="session")
def ft_cluster(stack, tmp_path_factory):
    """One cluster for both slow tests (a head start costs 20-60 s here); the head-failure test leaves a
    restarted, working head behind."""
    import redis

    namespace = f"peftray-test-{uuid.uuid4().hex[:8]}"
    state = tmp_path_factory.mktemp("ftcluster")
    token = state / "ray_auth_token"
    with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
        fh.write(secrets.token_hex(32))
    ports = dict(zip(servers.RAY_PORT_NAMES, procs.free_ports(len(servers.RAY_PORT_NAMES))))
    opts = servers.Options(state_dir=state, ray_num_cpus=3, ray_object_store_mb=256,
                           ray_redis_address=REDIS_ADDRESS, ray_redis_namespace=namespace,
                           ray_accept_nodes=True)  # other nodes join it (the session stack's head is loopback-only)
    cfg = dataclasses.replace(stack, ray_address=f"127.0.0.1:{ports['ray_gcs']}", ray_auth_token_path=str(token),
                              ray_dashboard_url=f"http://127.0.0.1:{ports['ray_dashboard']}")
    cluster = None
    try:
        cluster = FtCluster(opts, cfg, start_head(opts, ports, cfg))
        yield cluster
    finally:
        if cluster:
            procs.stop(cluster.head)
        shutil.rmtree(servers.ray_temp_dir(state), ignore_errors=True)
        client = redis.Redis.from_url(f"redis://{REDIS_ADDRESS}/0")
        keys = list(client.scan_iter(match=f"*{namespace}*"))
        if keys:
            client.delete(*keys)
