"""What every engine replica does first: keep its gRPC server on loopback, and fetch adapters through Serve's
multiplexing (so Serve routes an adapter's requests to the replicas that hold it)."""

from __future__ import annotations

import asyncio

from ray import serve


def keep_replica_grpc_on_loopback() -> None:
    """Bind this replica's inter-deployment gRPC server to 127.0.0.1 when its node is loopback-only.

    Serve starts that server (authenticated with the Ray token) on `[::]:0`, every interface, whatever the
    node's address; on the local stack, whose Ray binds only loopback, it takes the node's address instead.
    Runs in the replica's constructor, before Serve starts the server. A Ray without that hook is left alone.
    """
    import ray
    from ray.serve._private import replica as serve_replica

    bind = getattr(serve_replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "peftray_loopback", False):
        return
    if ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):
        return

    def loopback(server, address: str):
        return bind(server, "127.0.0.1:0" if address == "[::]:0" else address)

    loopback.peftray_loopback = True
    serve_replica.add_port_to_grpc_server = loopback


def adapter_fetcher(max_adapters: int):
    """`await fetch(key)` -> the adapter's local folder, through Serve's multiplexing (so Serve knows which
    replica holds which adapter and routes its requests there)."""

    async def fetch_adapter(key: str) -> str:
        from peftray.registry import fetch

        return str(await asyncio.to_thread(fetch, key))

    return serve.multiplexed(max_num_models_per_replica=max_adapters)(fetch_adapter)
