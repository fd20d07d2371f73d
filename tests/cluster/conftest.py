"""A two-node-capable Ray cluster of our own (not the session stack's): its head is killed and restarted here.

The head comes from `peftray.stack.up` with GCS fault tolerance on the machine's Redis (127.0.0.1:6379) under
a namespace of our own, whose keys are deleted at the end.
"""

from __future__ import annotations

import uuid

import pytest

REDIS_ADDRESS = "127.0.0.1:6379"


@pytest.fixture(scope="module")
def ft_cluster(tmp_path_factory):
    """(Options, Config) of a fresh local stack whose Ray head keeps its GCS state in Redis."""
    import redis

    from peftray import stack
    from peftray.config import load_config

    namespace = f"peftray-test-{uuid.uuid4().hex[:8]}"
    opts = stack.Options(state_dir=tmp_path_factory.mktemp("ftstack"), ray_num_cpus=3, ray_object_store_mb=256,
                         ray_redis_address=REDIS_ADDRESS, ray_redis_namespace=namespace)
    stack.up(opts)
    try:
        yield opts, load_config(opts.state_dir)
    finally:
        stack.down(opts.state_dir)
        client = redis.Redis.from_url(f"redis://{REDIS_ADDRESS}/0")
        keys = list(client.scan_iter(match=f"*{namespace}*"))
        if keys:
            client.delete(*keys)
