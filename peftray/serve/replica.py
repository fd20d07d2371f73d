"""What every engine replica does first: keep its gRPC server on loopback, and fetch adapters through Serve's
multiplexing (so Serve routes an adapter's requests to the replicas that hold it); and what the replica classes
(text, images, classification) share in `EngineReplica`: construction, counters, health, shutdown, and for the
single-answer ones (images, classification) one request run to its end."""

from __future__ import annotations

import asyncio
import os
from typing import Optional

from ray import serve

# every engine replica's Serve options: health checked every 2 s (a stalled engine is replaced), a short shutdown
REPLICA_OPTIONS = dict(health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)


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


def error_event(exc: BaseException) -> dict:
    """An OpenAI error for the ingress; adapter problems name `model`, the request's adapter."""
    from peftray.errors import AdapterFormatError, PeftrayError

    status = int(getattr(exc, "http_status", 500)) if isinstance(exc, PeftrayError) else 500
    msg = str(exc) if isinstance(exc, PeftrayError) else f"internal error in the engine: {type(exc).__name__}: {exc}"
    param = "model" if isinstance(exc, AdapterFormatError) else getattr(exc, "param", None)
    return {"error": {"status": status, "message": msg, "code": getattr(exc, "code", "internal_error"),
                      "param": param}}


class EngineReplica:
    """What the engine replicas share around their engine (`self.engine`, `self.spec`, `self._adapter_path`): the
    constructor (the subclass's `load_engine(spec)` makes the engine), one request run to its end, the counters
    its answer carries, health and shutdown."""

    load_engine = None  # spec -> engine, set by each replica class

    def __init__(self, spec: dict) -> None:
        from peftray.serve.serve_spec import ServeConfig

        keep_replica_grpc_on_loopback()
        self.spec = ServeConfig.model_validate(spec)
        self.engine = self.load_engine(self.spec)
        self._adapter_path = adapter_fetcher(self.spec.max_adapters_per_replica)

    async def run_request(self, key: Optional[str], submit):
        """Pin the adapter `key` (None: the base), `submit(adapter, on_done)` the request to the engine and wait
        for `on_done(result, error)`; the result, or the error raised. Cancelled (client gone, timeout): the
        request is cancelled in the engine, or its slot unpinned if it was not submitted yet."""
        adapter, handle = None, None
        try:
            if key:
                path = await self._adapter_path(key)
                adapter = await self.engine.slots.acquire_async(key, path)
            loop = asyncio.get_running_loop()
            done: asyncio.Future = loop.create_future()

            def on_done(result, error) -> None:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result((result, error)))

            try:
                handle = submit(adapter, on_done)
            except BaseException:
                if adapter is not None:
                    self.engine.slots.release(adapter)
                raise
            result, error = await done
            if error is not None:
                raise error
            return result
        except asyncio.CancelledError:
            if handle is not None:
                self.engine.cancel(handle)
            elif adapter is not None:
                self.engine.slots.release(adapter)
            raise

    def _counters(self) -> dict:
        e = self.engine
        return {"running": e.running, "queued": e.queued, "loads": e.slots.loads, "evictions": e.slots.evictions,
                "load_seconds": e.slots.load_seconds, "loaded": len(e.loaded_adapters()), "pid": os.getpid()}

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():
            raise RuntimeError("the engine thread stopped")
        stalled = self.engine.stalled_for()
        if stalled > self.spec.stall_timeout_s:  # Serve replaces an unhealthy replica
            raise RuntimeError(f"the engine has had requests but finished no step for {stalled:.0f} s")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
