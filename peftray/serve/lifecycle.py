"""`deploy`, `status`, `down`: run a serve spec as a Ray Serve application on the configured Ray cluster.

Serve's HTTP proxy binds 127.0.0.1 on a free port (or `http_port`) the first time; later applications share
it, each under its own route prefix `/<name>`, so the OpenAI base URL is `http://127.0.0.1:<port>/<name>/v1`.
The URL and API key are recorded in the local stack's state file (`serve_url`, `serve_api_key`), so
`load_config()` (and `peftray demo`) find them.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from peftray.endpoints import Config, keep_loopback_ray, load_config
from peftray.errors import PeftrayError, StackError
from peftray.serve.proxy_gate import publish
from peftray.serve.serve_spec import ServeConfig, load_serve_config
from peftray.stack.procs import free_port
from peftray.stack.state import update_state


@dataclass
class Deployment:
    """A running serve application: where to reach it and with which key."""

    name: str
    url: str  # the OpenAI base URL is url + "/v1"
    api_key: Optional[str]
    port: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def connect(cfg: Config) -> None:
    """This process as a driver of the configured Ray cluster (token auth from the config)."""
    cfg.apply_env()
    import ray

    if not ray.is_initialized():
        if not cfg.ray_address:
            raise StackError("no Ray cluster is configured; start the local stack (peftray stack up) or set "
                             "PEFTRAY_RAY_ADDRESS.")
        keep_loopback_ray(cfg.ray_address)
        ray.init(address=cfg.ray_address, log_to_driver=False, include_dashboard=False, ignore_reinit_error=True)


def serve_port(requested: Optional[int] = None) -> int:
    """The Serve HTTP proxy's port, starting Serve on 127.0.0.1 (free port unless `requested`) if needed."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        from peftray.serve.proxy_errors import CALLBACK

        # the proxy answers a dead ingress replica itself; this makes that answer OpenAI's JSON error (503)
        serve.start(http_options={"host": "127.0.0.1", "port": requested or free_port()},
                    controller_options={"runtime_env": {"env_vars": {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH":
                                                                     CALLBACK}}})
        client = _get_global_client()
    return int(client.http_config.port)


def deploy(spec: ServeConfig | str | Path, config: Optional[Config] = None, wait_s: float = 300.0) -> Deployment:
    """Deploy (or update in place) the application of a serve spec and wait until it is RUNNING.

    Args:
        spec: a ServeConfig or the path of a serve.yaml.
        config: endpoints; default `load_config()`.
        wait_s: give up (StackError) when the application is not running after this long.

    Returns:
        The Deployment (URL and API key).
    """
    from ray import serve

    from peftray.serve.app import build_app

    spec = spec if isinstance(spec, ServeConfig) else load_serve_config(spec)
    cfg = config or load_config()
    connect(cfg)
    port = serve_port(spec.http_port)
    api_key = spec.api_key or os.environ.get("PEFTRAY_SERVE_API_KEY") or cfg.serve_api_key or \
        secrets.token_urlsafe(24)
    serve.run(build_app(spec, cfg.env(), api_key), name=spec.name, route_prefix=f"/{spec.name}", blocking=False)
    publish(spec.name, spec.capacity)  # the proxies refuse past it at once (proxy_gate)
    _wait_running(spec.name, wait_s)
    dep = Deployment(spec.name, f"http://127.0.0.1:{port}/{spec.name}", api_key, port)
    _record(cfg, dep)
    return dep


def _wait_running(name: str, wait_s: float) -> None:
    from ray import serve

    deadline, state = time.monotonic() + wait_s, None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        state = str(getattr(app, "status", "")) if app else "MISSING"
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED"):
            raise StackError(f"serve application {name!r} failed to deploy: {getattr(app, 'message', '')}")
        time.sleep(0.5)
    raise StackError(f"serve application {name!r} is not running after {wait_s:g} s (state {state}); see "
                     "`peftray serve status` and the Ray dashboard's Serve tab.")


def _record(cfg: Config, dep: Deployment) -> None:
    """Remember the URL and key in the stack's state file (when there is a local stack)."""

    def change(state: dict[str, Any]) -> None:
        state.setdefault("endpoints", {}).update(serve_url=dep.url, serve_api_key=dep.api_key)
        state.setdefault("serve", {})[dep.name] = dep.to_dict()

    update_state(cfg.state_dir, change)


def status(config: Optional[Config] = None) -> dict[str, Any]:
    """Every Serve application: its state, and per deployment its state and replica counts."""
    from ray import serve

    connect(config or load_config())
    out: dict[str, Any] = {}
    for name, app in serve.status().applications.items():
        deps = {d: {"status": str(s.status).rsplit(".", 1)[-1], "replicas": dict(s.replica_states or {}),
                    "message": s.message} for d, s in app.deployments.items()}
        out[name] = {"status": str(app.status).rsplit(".", 1)[-1], "message": app.message, "deployments": deps}
    return out


def down(name: Optional[str] = None, config: Optional[Config] = None) -> list[str]:
    """Delete one application (or all of them, and Serve itself, when `name` is None); returns what was removed."""
    from ray import serve

    cfg = config or load_config()
    connect(cfg)
    apps = list(serve.status().applications)
    if name is not None and name not in apps:
        raise PeftrayError(f"no serve application {name!r}; running: {apps or 'none'}.")
    if name is None:
        serve.shutdown()
        for app in apps:
            publish(app, None)
        return apps
    serve.delete(name)
    publish(name, None)
    return [name]
