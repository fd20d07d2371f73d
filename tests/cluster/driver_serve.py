"""Ray driver (run as a subprocess by test_cluster_head_failure.py): deploy a trivial Serve app, or report status.

    python driver_serve.py deploy HTTP_PORT   # app `echo` on the node with resource `node_c`; exits, app stays
    python driver_serve.py status             # the app's status as the (possibly restarted) controller sees it
"""

from __future__ import annotations

import json
import os
import sys

import ray
from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {"node_c": 0.01}})
class Echo:
    """Answers with the identity of the replica process, so a test can tell a restarted replica apart."""

    def __init__(self):
        self.pid = os.getpid()
        self.node_id = ray.get_runtime_context().get_node_id()

    async def __call__(self, request) -> dict:
        return {"pid": self.pid, "node_id": self.node_id}


def main() -> None:
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    if sys.argv[1] == "deploy":
        # Proxies on every node with replicas: the worker node's proxy keeps serving while the head is down.
        serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2]), "location": "EveryNode"})
        serve.run(Echo.bind(), name="echo", route_prefix="/")
    apps = serve.status().applications
    print(json.dumps({name: getattr(app.status, "value", str(app.status)) for name, app in apps.items()}), flush=True)


if __name__ == "__main__":
    main()
