"""Clients for the registry's two stores: the MLflow tracking/registry server and the S3 bucket behind it.

MLflow is the source of truth for names, versions, tags and aliases; S3 holds the bytes (the MLflow server
runs with `--serve-artifacts --artifacts-destination s3://<bucket>/mlflow-artifacts`) and the audit log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Iterator

from peftray.endpoints import Config, load_config
from peftray.errors import ConfigError, NotFoundError, PeftrayError

# The experiment that holds the runs peftray creates for adapters registered without a training run.
REGISTRY_EXPERIMENT = "peftray-registry"
# Where the MLflow server keeps proxied artifacts; override when a production server uses another destination.
ARTIFACTS_ROOT_ENV = "PEFTRAY_MLFLOW_ARTIFACTS_ROOT"
# Prefix of the promotion audit log in the bucket.
AUDIT_PREFIX = "peftray-registry/audit"

# MLflow logs one INFO line per version creation ("Waiting up to 300 seconds ..."); keep CLI output clean.
logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)


def get_config(config: Config | None) -> Config:
    cfg = config or load_config()
    if not cfg.mlflow_tracking_uri:
        raise ConfigError(
            "no MLflow tracking server configured (MLFLOW_TRACKING_URI is unset and no local stack state was found). "
            "Start one with `peftray stack up` or set MLFLOW_TRACKING_URI.")
    return cfg


def mlflow_client(config: Config | None = None):
    """An `MlflowClient` for the config's tracking server (also its model registry)."""
    from mlflow import MlflowClient

    cfg = get_config(config)
    # MLflow 3 prints "View run ... at" to stdout when a run ends; that would corrupt `--json` CLI output.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow's REST client reads basic-auth credentials from the environment at request time.
    if cfg.mlflow_username and not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        os.environ["MLFLOW_TRACKING_USERNAME"] = cfg.mlflow_username
        os.environ["MLFLOW_TRACKING_PASSWORD"] = cfg.mlflow_password or ""
    return MlflowClient(tracking_uri=cfg.mlflow_tracking_uri, registry_uri=cfg.mlflow_tracking_uri)


@contextlib.contextmanager
def mlflow_errors(what: str, hint: str = "") -> Iterator[None]:
    """Turn MLflow's 'does not exist' answers into NotFoundError that names `what` (other errors pass through)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        text = str(exc)
        if code == "RESOURCE_DOES_NOT_EXIST" or "not found" in text.lower():
            raise NotFoundError(f"{what} was not found in the MLflow registry.{(' ' + hint) if hint else ''}") from exc
        raise PeftrayError(f"MLflow refused the request for {what}: {text}") from exc


_S3FS: dict[tuple, object] = {}


def s3fs_for(config: Config):
    """An s3fs filesystem for the config's object store, reused across calls in this process.

    Creating one costs a new aiobotocore session and connection pool (~0.3 s), more than downloading a
    10 MB adapter on a local network; fsspec makes instances fork-safe.
    """
    key = (config.s3_endpoint_url, config.aws_access_key_id, config.aws_secret_access_key)
    if key not in _S3FS:
        _S3FS[key] = config.s3fs()
    return _S3FS[key]


def boto3_s3(config: Config):
    """A boto3 S3 client for the config's object store (conditional writes for the audit log)."""
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "s3", endpoint_url=config.s3_endpoint_url, aws_access_key_id=config.aws_access_key_id,
        aws_secret_access_key=config.aws_secret_access_key,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=BotoConfig(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=32),
    )


def artifacts_root(config: Config) -> str:
    """`bucket/prefix` (no scheme) where the MLflow server stores proxied artifacts."""
    root = os.environ.get(ARTIFACTS_ROOT_ENV) or f"s3://{config.bucket}/mlflow-artifacts"
    return root.removeprefix("s3://").rstrip("/")


_PROXIED = re.compile(r"^mlflow-artifacts:(//[^/]*)?/?(?P<path>.*)$")


def s3_path_of(artifact_uri: str, config: Config) -> str | None:
    """The physical `bucket/key` of an MLflow artifact URI, or None when it is not in S3.

    `mlflow-artifacts:/1/<run>/artifacts/x` (served by the MLflow server) lives under the server's artifacts
    destination; an `s3://` URI is already physical.
    """
    if artifact_uri.startswith("s3://"):
        return artifact_uri.removeprefix("s3://").rstrip("/")
    m = _PROXIED.match(artifact_uri)
    if m:
        return f"{artifacts_root(config)}/{m.group('path').strip('/')}"
    return None
