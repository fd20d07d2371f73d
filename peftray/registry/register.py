"""`register_adapter`: an adapter folder (local or s3://) becomes one MLflow model version, or nothing at all."""

from __future__ import annotations

import contextlib
import json
import math
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from peftray.endpoints import Config
from peftray.errors import ConfigError, NotFoundError, PeftrayError
from peftray.registry import types as t
from peftray.registry.client import (REGISTRY_EXPERIMENT, get_config, mlflow_client, mlflow_errors, s3_path_of,
                                     s3fs_for)
from peftray.registry.owners import TAG_OWNER, check_owner
from peftray.registry.types import AdapterVersion
from peftray.registry.validate import AdapterInfo, validate_adapter_dir

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESERVED_TAG_PREFIXES = (t.T, t.METRIC_PREFIX)
_TAG_KEY_RE = re.compile(r"^[\w\-. :/]{1,250}$")


def register_adapter(adapter_dir: str | Path, name: str, *, base_model: str | None = None,
                     base_revision: str | None = None, run_id: str | None = None, job_name: str | None = None,
                     metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
                     dataset_fingerprint: str | None = None, description: str | None = None,
                     owner: str | None = None, owner_is_admin: bool = False,
                     config: Config | None = None) -> AdapterVersion:
    """Register an adapter folder as a new version of the registered model `name`.

    The folder is validated first (adapter_config.json with a known peft_type, a readable
    adapter_model.safetensors, no pickle files), then uploaded to the run's artifacts (`run_id`, else a run
    created in the `peftray-registry` experiment) and registered with tags recording the base model and
    revision, method, rank, target modules, metrics, dataset fingerprint, job name and the sha256 of every file.

    Args:
        adapter_dir: local folder or `s3://bucket/prefix` written by `save_pretrained` (or peftray's trainer).
        name: registered model name (letters, digits, `.`, `_`, `-`).
        base_model: base model id; default `base_model_name_or_path` from adapter_config.json.
        base_revision: base model revision; default `revision` from adapter_config.json.
        run_id: MLflow run to attach the artifacts to (the training run).
        job_name: peftray job that produced the adapter; part of the idempotency key.
        metrics: evaluation metrics (used by promotion gates).
        tags: extra version tags; a `method` tag overrides the method read from the config (e.g. `qlora`).
        dataset_fingerprint: digest of the training data.
        description: free text shown in listings.
        owner: the user registering (a service job's owner): a new name becomes theirs; a name owned by
            someone else is refused unless `owner_is_admin`. None: an operator with registry credentials.
        owner_is_admin: the owner holds admin rights (may add versions under any name).
        config: endpoints; default `load_config()`.

    Returns:
        The new version, or the existing one when the same bytes were already registered for the same job.

    Raises:
        AdapterFormatError: the folder is not a valid safetensors adapter.
        ConfigError: a bad name, tag or metric.
        NotFoundError: `run_id` does not exist.
        ForbiddenError: `name` belongs to another user (the refusal is recorded in its audit log).
    """
    cfg = get_config(config)
    check_name(name)
    claim = Claim(owner, owner_is_admin, cfg)
    claim.check(name)
    metrics = _check_metrics(metrics or {})
    user_tags = _check_tags(tags or {})
    with local_copy(adapter_dir, cfg) as local:
        info = validate_adapter_dir(local)
        client = mlflow_client(cfg)
        existing = find_existing(client, name, info.content_sha256, job_name)
        if existing is not None:
            return existing
        vtags = version_tags(info, base_model=base_model, base_revision=base_revision, job_name=job_name,
                             metrics=metrics, user_tags=user_tags, dataset_fingerprint=dataset_fingerprint)
        return _create(client, cfg, local, name, info, run_id, vtags, description, metrics, claim)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(
            f"adapter name must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
            f"got {name!r}. '/' and '@' are reserved for references like name/3 and name@production.")
    return name


def _check_metrics(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"metric {key!r} must be a number, got {value!r}.") from None
        if not math.isfinite(out[str(key)]):
            raise ConfigError(f"metric {key!r} must be finite, got {value!r}: a NaN/inf metric cannot gate a promotion.")
    return out


def _check_tags(tags: dict[str, str]) -> dict[str, str]:
    for key in tags:
        if not _TAG_KEY_RE.match(str(key)):
            raise ConfigError(f"tag key {key!r} may only hold letters, digits, '_', '-', '.', ' ', ':' and '/' "
                              "(MLflow's rule for tag names).")
        if str(key).startswith(_RESERVED_TAG_PREFIXES):
            raise ConfigError(f"tag {key!r} uses a prefix peftray reserves ({', '.join(_RESERVED_TAG_PREFIXES)}); "
                              "rename the tag, or pass metrics=... for metrics.")
    return {str(k): str(v) for k, v in tags.items()}


@contextlib.contextmanager
def local_copy(adapter_dir: str | Path, cfg: Config) -> Iterator[Path]:
    """The adapter folder as a local path: itself, or an s3:// folder downloaded into a temporary one."""
    src = str(adapter_dir)
    if not src.startswith("s3://"):
        yield Path(src)
        return
    fs = s3fs_for(cfg)
    root = src.removeprefix("s3://").rstrip("/")
    keys = [k for k in fs.find(root) if not k.rstrip("/").endswith("/")]
    if not keys:
        raise NotFoundError(f"no adapter files under {src!r}: check the bucket and prefix (s3://bucket/prefix).")
    with tempfile.TemporaryDirectory(prefix="peftray-import-") as tmp:
        lpaths = [str(Path(tmp) / k[len(root) + 1:]) for k in keys]
        for lp in lpaths:
            Path(lp).parent.mkdir(parents=True, exist_ok=True)
        fs.get(keys, lpaths)  # s3fs downloads the list concurrently
        yield Path(tmp)


def find_existing(client, name: str, content_sha256: str, job_name: str | None) -> AdapterVersion | None:
    """The version of `name` with these exact bytes and this job name, if one was registered."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}' and tags.`{t.TAG_CONTENT}` = '{content_sha256}'")
    except MlflowException:
        return None
    for mv in sorted(found, key=lambda m: int(m.version)):
        if (mv.tags or {}).get(t.TAG_JOB, "") == (job_name or ""):
            return AdapterVersion.from_model_version(client.get_model_version(name, mv.version))
    return None


def version_tags(info: AdapterInfo, *, base_model, base_revision, job_name, metrics, user_tags,
                 dataset_fingerprint) -> dict[str, str]:
    cfg = info.config
    base = base_model or cfg.get("base_model_name_or_path")
    revision = base_revision or cfg.get("revision")
    tags = dict(user_tags)
    tags.update({
        t.TAG_METHOD: user_tags.get("method", info.method), t.TAG_PEFT_TYPE: cfg["peft_type"],
        t.TAG_TARGET_MODULES: json.dumps(info.target_modules), t.TAG_FILES: json.dumps(info.files, sort_keys=True),
        t.TAG_SIZES: json.dumps(info.sizes, sort_keys=True),
        t.TAG_CONTENT: info.content_sha256,
    })
    optional = {t.TAG_BASE_MODEL: base, t.TAG_BASE_REVISION: revision, t.TAG_TASK_TYPE: cfg.get("task_type"),
                t.TAG_RANK: info.rank, t.TAG_JOB: job_name, t.TAG_DATASET: dataset_fingerprint}
    tags.update({k: str(v) for k, v in optional.items() if v not in (None, "")})
    config_json = json.dumps(cfg, sort_keys=True)
    if len(config_json) <= 5000:  # keep the tag well inside every backend's column size; diff reads it
        tags[t.TAG_ADAPTER_CONFIG] = config_json
    tags.update({t.METRIC_PREFIX + k: repr(v) for k, v in metrics.items()})
    return tags


@dataclass(frozen=True)
class Claim:
    """Who registers: checked before any upload, and again once the model exists (two first registrations
    of one name race; the model's owner tag, written at creation, decides)."""

    owner: str | None
    is_admin: bool
    cfg: Config

    def check(self, name: str) -> None:
        if self.owner is not None:
            check_owner(name, self.owner, is_admin=self.is_admin, action="register a new version of it",
                        config=self.cfg)

    def tags(self) -> dict[str, str]:
        return {TAG_OWNER: self.owner} if self.owner else {}


def _create(client, cfg: Config, local: Path, name: str, info: AdapterInfo, run_id: str | None,
            vtags: dict[str, str], description: str | None, metrics: dict[str, float],
            claim: Claim) -> AdapterVersion:
    """Upload + register; on any failure remove what this call created (run, artifacts, model, version)."""
    from mlflow.exceptions import MlflowException

    made: dict = {"run": None, "model": False, "s3": None, "run_id": run_id, "source": None}
    try:
        if run_id is None:
            run = _new_run(client, name, vtags.get(t.TAG_JOB), metrics, vtags)
            made["run"] = made["run_id"] = run.info.run_id
        else:
            with mlflow_errors(f"MLflow run {run_id!r}", "Pass the run_id of an existing run, or none."):
                run = client.get_run(run_id)
        # A fresh folder per attempt: a failed attempt's cleanup never touches another version's files.
        artifact_path = f"adapters/{name}/{info.content_sha256[:12]}-{uuid.uuid4().hex[:8]}"
        made["source"] = source = f"{run.info.artifact_uri}/{artifact_path}"
        made["s3"] = s3_path_of(source, cfg)
        client.log_artifacts(made["run_id"], str(local), artifact_path)
        if _uploaded_to_s3(cfg, made["s3"], info):
            vtags[t.TAG_S3_URI] = f"s3://{made['s3']}"
        if made["run"]:
            client.set_terminated(made["run"])
        made["model"] = _ensure_model(client, name, claim.tags())
        claim.check(name)
        mv = client.create_model_version(name, source, run_id=made["run_id"], tags=vtags, description=description)
        first = find_existing(client, name, info.content_sha256, vtags.get(t.TAG_JOB))
        if first is not None and first.version < int(mv.version):
            # A concurrent registration of the same bytes for the same job got in first: the lowest version
            # wins in every racer, so ours (version, artifacts, run) goes and exactly one version remains.
            _undo(client, cfg, name, {**made, "model": False})
            return first
        return AdapterVersion.from_model_version(mv, aliases=[])
    except BaseException as exc:
        _undo(client, cfg, name, made)
        if isinstance(exc, MlflowException):
            raise PeftrayError(f"MLflow refused registering {name!r} (nothing was kept): {exc}") from exc
        raise


def _new_run(client, name: str, job_name: str | None, metrics: dict[str, float], vtags: dict[str, str]):
    """A run in the registry experiment holding the artifacts (and, for the MLflow UI, metrics and params)."""
    from mlflow.entities import Metric, Param

    run = client.create_run(_experiment_id(client), run_name=f"register-{job_name or name}",
                            tags={"peftray.registered_model": name})
    now = int(time.time() * 1000)
    params = [Param(k.removeprefix(t.T), vtags[k]) for k in (t.TAG_BASE_MODEL, t.TAG_METHOD, t.TAG_RANK) if k in vtags]
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()], params=params)
    return run


_EXPERIMENT_IDS: dict[str, str] = {}  # tracking URI -> id of the registry experiment (it is never renamed)


def _experiment_id(client) -> str:
    key = client.tracking_uri
    if key not in _EXPERIMENT_IDS:
        exp = client.get_experiment_by_name(REGISTRY_EXPERIMENT)
        _EXPERIMENT_IDS[key] = exp.experiment_id if exp else _create_experiment(client)
    return _EXPERIMENT_IDS[key]


def _create_experiment(client) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(REGISTRY_EXPERIMENT)
    except MlflowException:  # another process created it first
        return client.get_experiment_by_name(REGISTRY_EXPERIMENT).experiment_id


def _uploaded_to_s3(cfg: Config, s3_path: str | None, info: AdapterInfo) -> bool:
    """True when every file is in the bucket where we expect the MLflow server put it (fetch reads it there)."""
    if not s3_path or not cfg.s3_endpoint_url and not cfg.aws_access_key_id:
        return False
    try:
        found = s3fs_for(cfg).find(s3_path, detail=True)
    except Exception:  # noqa: BLE001 - a server with another artifact store: fetch goes through MLflow instead
        return False
    sizes = {k[len(s3_path) + 1:]: v.get("size") for k, v in found.items()}
    return all(sizes.get(rel) == size for rel, size in info.sizes.items())


def _ensure_model(client, name: str, owner_tags: dict[str, str]) -> bool:
    """Create the registered model if needed; True when this call created it."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return False
    except MlflowException:
        pass
    try:
        client.create_registered_model(name, tags={t.TAG_IS_ADAPTER: "true", **owner_tags})
        return True
    except MlflowException:  # created concurrently by another registration
        return False


def _undo(client, cfg: Config, name: str, made: dict) -> None:
    """Best-effort removal of what a failed registration created, newest first."""
    steps = []
    if made["source"]:  # a version may exist if the failure came after the server created it
        steps.append(lambda: [client.delete_model_version(name, mv.version) for mv in client.search_model_versions(
            f"name='{name}' and run_id='{made['run_id']}'") if mv.source == made["source"]])
    if made["model"]:
        steps.append(lambda: client.search_model_versions(f"name='{name}'") or client.delete_registered_model(name))
    if made["s3"]:
        steps.append(lambda: s3fs_for(cfg).rm(made["s3"], recursive=True))
    if made["run"]:
        steps.append(lambda: client.delete_run(made["run"]))
    for step in steps:
        try:
            step()
        except Exception:  # noqa: BLE001 - cleanup must not hide the original error
            pass
