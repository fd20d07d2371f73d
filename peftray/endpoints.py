"""Where peftray's servers are and how to reach them: one config object for every client.

Values come from the local stack's state file (`<state dir>/stack.json`, written by `peftray stack up`),
then environment variables override them, so the same code points at a real cluster, a real S3 bucket
and a remote MLflow in production:

| variable | meaning |
|---|---|
| `PEFTRAY_STATE_DIR` | the local stack's state folder (default `.peftray` in the working directory) |
| `PEFTRAY_S3_ENDPOINT_URL` (or `MLFLOW_S3_ENDPOINT_URL`) | S3 endpoint; unset = AWS |
| `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` | S3 credentials |
| `PEFTRAY_BUCKET` | bucket for checkpoints and artifacts (default `peftray`) |
| `MLFLOW_TRACKING_URI` | MLflow tracking server |
| `MLFLOW_TRACKING_USERNAME`, `MLFLOW_TRACKING_PASSWORD` | MLflow basic-auth credentials |
| `PEFTRAY_RAY_ADDRESS` (or `RAY_ADDRESS`) | Ray GCS address `host:port` |
| `PEFTRAY_RAY_DASHBOARD_URL` | Ray dashboard / Jobs API URL |
| `RAY_AUTH_TOKEN_PATH` | file holding the Ray cluster's auth token |
| `PEFTRAY_SERVICE_URL`, `PEFTRAY_TOKEN` | control-plane URL and API token |
| `PEFTRAY_SERVE_URL`, `PEFTRAY_SERVE_API_KEY` | serving endpoint and its API key |
| `PEFTRAY_CACHE_DIR` | local adapter cache (default `~/.cache/peftray`) |
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "stack.json"
DEFAULT_BUCKET = "peftray"
# Ray Train's controller checks on its workers every 2 s by default, and each step of a run's start (workers
# created, train context set up, training started) and its end waits for the next check: measured here, a
# 1-worker fit took 4-5 s longer at 2 s than at 0.25 s (17.6 vs 12.9 s, median of 5). Set on the local stack's
# Ray processes, on every job the service submits, and in the image; an operator's own value wins.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def ray_train_env() -> dict[str, str]:
    """`RAY_TRAIN_ENV`, each value overridden by this process's own environment where set."""
    return {k: os.environ.get(k, v) for k, v in RAY_TRAIN_ENV.items()}


# Secret values: kept in 0600 files and process memory only, never handed to Ray (job runtime_env, actor
# options, Serve configs), printed by `stack status`, or put on a command line.
SECRET_ENDPOINTS = ("aws_secret_access_key", "mlflow_password", "service_token", "serve_api_key")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PEFTRAY_TOKEN", "PEFTRAY_SERVE_API_KEY",
              "PEFTRAY_SERVICE_ADMIN_TOKEN")


@dataclass(frozen=True)
class Config:
    """Endpoints and credentials of the servers peftray talks to."""

    state_dir: Path
    s3_endpoint_url: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    bucket: str = DEFAULT_BUCKET
    mlflow_tracking_uri: str | None = None
    mlflow_username: str | None = None
    mlflow_password: str | None = None
    ray_address: str | None = None
    ray_dashboard_url: str | None = None
    ray_auth_token_path: str | None = None
    service_url: str | None = None
    service_token: str | None = None
    serve_url: str | None = None
    serve_api_key: str | None = None
    cache_dir: Path = dataclasses.field(default_factory=lambda: Path.home() / ".cache" / "peftray")

    @property
    def ray_auth_token(self) -> str | None:
        if not self.ray_auth_token_path:
            return None
        try:
            return Path(self.ray_auth_token_path).read_text().strip()
        except OSError:
            return None

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for `s3fs.S3FileSystem` / fsspec `storage_options`."""
        opts: dict[str, Any] = {}
        if self.aws_access_key_id:
            opts["key"] = self.aws_access_key_id
            opts["secret"] = self.aws_secret_access_key
        if self.s3_endpoint_url:
            opts["client_kwargs"] = {"endpoint_url": self.s3_endpoint_url}
        return opts

    def s3fs(self):
        """An `s3fs.S3FileSystem` for this config's object store (a fresh instance, not cached)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())

    def env(self) -> dict[str, str]:
        """Environment variables that point MLflow, boto3, s3fs and Ray clients at these servers.

        Used for child processes (Ray job runtime env, the MLflow server) and by `apply_env()`.
        """
        pairs = {
            "PEFTRAY_STATE_DIR": str(self.state_dir),
            "PEFTRAY_BUCKET": self.bucket,
            "PEFTRAY_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "AWS_ENDPOINT_URL": self.s3_endpoint_url,
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key,
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "MLFLOW_TRACKING_USERNAME": self.mlflow_username,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
            "PEFTRAY_RAY_ADDRESS": self.ray_address,
            "PEFTRAY_RAY_DASHBOARD_URL": self.ray_dashboard_url,
            "RAY_AUTH_TOKEN_PATH": self.ray_auth_token_path,
            "PEFTRAY_SERVICE_URL": self.service_url,
            "PEFTRAY_TOKEN": self.service_token,
            "PEFTRAY_SERVE_URL": self.serve_url,
            "PEFTRAY_SERVE_API_KEY": self.serve_api_key,
            "PEFTRAY_CACHE_DIR": str(self.cache_dir),
        }
        env = {k: v for k, v in pairs.items() if v}
        if self.ray_auth_token_path:
            env["RAY_AUTH_MODE"] = "token"
        if self.aws_access_key_id:
            env.setdefault("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        return env

    def public_env(self) -> dict[str, str]:
        """`env()` without its secret values: what may travel through Ray to jobs, workers and replicas.

        They find the secrets where Ray never records them: in their node's environment (the local stack
        starts the Ray head with them, and Ray's workers inherit it) or in the stack's 0600 state file, which
        `load_config()` reads through PEFTRAY_STATE_DIR.
        """
        return without_secrets(self.env())

    def apply_env(self) -> None:
        """Export `env()` into this process so libraries that read the environment find the servers.

        Ray caches its auth mode when it first loads its config; if Ray was imported before the token mode
        was exported here, the cache is refreshed (as `ray.init` does itself when it turns token auth on),
        or the driver would reach a token-protected cluster without its token and fail to connect.
        """
        before = os.environ.get("RAY_AUTH_MODE")
        os.environ.update(self.env())
        if os.environ.get("RAY_AUTH_MODE") != before and "ray._raylet" in sys.modules:
            sys.modules["ray._raylet"].Config.initialize("")


def without_secrets(env: dict[str, str]) -> dict[str, str]:
    """`env` less the variables that hold secrets (SECRET_ENV)."""
    return {k: v for k, v in env.items() if k not in SECRET_ENV}


def default_state_dir() -> Path:
    return Path(os.environ.get("PEFTRAY_STATE_DIR") or ".peftray").absolute()


def read_state(state_dir: Path) -> dict[str, Any]:
    """The stack's state file as a dict, or {} when there is none (or it is unreadable)."""
    path = Path(state_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _first_env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def load_config(state_dir: str | Path | None = None) -> Config:
    """Build the config: the stack's state file first, environment variables over it."""
    sdir = Path(state_dir).absolute() if state_dir else default_state_dir()
    endpoints = read_state(sdir).get("endpoints", {})

    def pick(key: str, *env_names: str) -> Any:
        return _first_env(*env_names) or endpoints.get(key)

    cache = _first_env("PEFTRAY_CACHE_DIR")
    return Config(
        state_dir=sdir,
        s3_endpoint_url=pick("s3_endpoint_url", "PEFTRAY_S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"),
        aws_access_key_id=pick("aws_access_key_id", "AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=pick("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
        bucket=pick("bucket", "PEFTRAY_BUCKET") or DEFAULT_BUCKET,
        mlflow_tracking_uri=pick("mlflow_tracking_uri", "MLFLOW_TRACKING_URI"),
        mlflow_username=pick("mlflow_username", "MLFLOW_TRACKING_USERNAME"),
        mlflow_password=pick("mlflow_password", "MLFLOW_TRACKING_PASSWORD"),
        ray_address=pick("ray_address", "PEFTRAY_RAY_ADDRESS", "RAY_ADDRESS"),
        ray_dashboard_url=pick("ray_dashboard_url", "PEFTRAY_RAY_DASHBOARD_URL"),
        ray_auth_token_path=pick("ray_auth_token_path", "RAY_AUTH_TOKEN_PATH"),
        service_url=pick("service_url", "PEFTRAY_SERVICE_URL"),
        service_token=pick("service_token", "PEFTRAY_TOKEN"),
        serve_url=pick("serve_url", "PEFTRAY_SERVE_URL"),
        serve_api_key=pick("serve_api_key", "PEFTRAY_SERVE_API_KEY"),
        cache_dir=Path(cache) if cache else Path.home() / ".cache" / "peftray",
    )


LOOPBACK_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_loopback_ray(address: str | None) -> None:
    """Let a client reach a Ray cluster at 127.0.0.1 (the local stack binds only loopback).

    When connecting, Ray turns a loopback address into the machine's own address (so that other nodes could
    join) and finds nothing listening there. Its switch for single-machine clusters, named after Windows and
    macOS, keeps 127.0.0.1; Ray reads it on import, so the constant is set too when `ray` is loaded already.
    Other addresses (a real cluster) are left alone.
    """
    host = (address or "").removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        return
    if os.environ.setdefault(LOOPBACK_RAY_ENV, "0").lower() in ("1", "true"):
        return  # set by whoever started us: a multi-node head on this machine binds its address, not loopback
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
