"""`run_job(spec)`: the driver. Check everything it can, run the Ray Train job, register the adapter once.

Order matters for "fail fast, leave nothing behind": spec, cluster resources, tokenizer and data are all
checked before the MLflow run is created or a worker starts. The adapter is registered from the trainer's
final result (its last checkpoint), never by listing the storage folder.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftray.endpoints import Config, keep_loopback_ray, load_config
from peftray.data import BatchPlan
from peftray.errors import GateError, PeftrayError
from peftray.jobspec import JobSpec, load_spec
from peftray.train import checkpoint
from peftray.train.loop import TIMING, check_precision
from peftray.train.model import check_quantization, resolve_base, tokenizer_and_data
from peftray.train.scaling import check_cluster, scaling_config, torch_backend
from peftray.train.tracking import OPERATOR


def _process_start() -> float:
    """When this process started (wall clock): the job's phases are timed from the driver's start. Linux reads
    /proc; elsewhere the time this module was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


DRIVER_START = _process_start()


class TrainingError(PeftrayError, RuntimeError):
    """The Ray Train job failed after its retries."""

    code = "training_failed"


@dataclass
class TrainResult:
    """What a finished job produced: the MLflow run, the registered version and its final metrics."""

    run_id: str
    model_name: str
    version: int
    metrics: dict[str, float]
    adapter_uri: str
    job_name: str = ""
    promoted_alias: str | None = None
    promotion_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _absolute_paths(spec: JobSpec) -> JobSpec:
    # Workers may start in another directory than the driver; pin local paths before shipping the spec.
    updates = {}
    if Path(spec.base_model.path).exists():
        updates["base_model"] = spec.base_model.model_copy(update={"path": str(Path(spec.base_model.path).absolute())})
    src = spec.dataset.source
    if not src.startswith("s3://") and Path(src).exists():
        updates["dataset"] = spec.dataset.model_copy(update={"source": str(Path(src).absolute())})
    return spec.model_copy(update=updates) if updates else spec


def connect_ray(cfg: Config, namespace: str | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster from the config (RAY_ADDRESS / the local stack), or start a local one."""
    cfg.apply_env()  # before Ray reads its auth settings: the token path and storage credentials
    import ray

    if ray.is_initialized():
        return
    keep_loopback_ray(cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    ray.init(address=cfg.ray_address or os.environ.get("RAY_ADDRESS"), namespace=namespace,
             log_to_driver=log_to_driver, include_dashboard=False, ignore_reinit_error=True)


def preflight(spec: JobSpec, cfg: Config, cluster: bool = True) -> str:
    """Every check that needs no worker: resources (`cluster`: for Ray Train's workers), quantization, precision,
    tokenizer, data. Returns the dataset fingerprint."""
    if cluster:
        import ray

        check_cluster(spec.resources, ray.cluster_resources())
    check_quantization(spec)
    check_precision(spec)
    _, data = tokenizer_and_data(spec, resolve_base(spec, cfg), cfg)
    t = spec.training
    BatchPlan(len(data.train), t.batch_size, spec.resources.num_workers, t.gradient_accumulation_steps, t.seed).check()
    return data.fingerprint


def in_process_eligible(spec: JobSpec) -> bool:
    """Whether a warm runner may train `spec` in its own process: one worker, no accelerator."""
    r = spec.resources
    return r.num_workers == 1 and not r.use_gpu and not r.use_tpu


def run_folder(spec: JobSpec, owner: str | None) -> tuple[str, str]:
    """(storage path, run name) of a job's checkpoints: `train/<owner>/<name>-<spec fingerprint>`.

    Ray Train resumes from whatever checkpoint is in that folder, so the folder is the run's identity: a job
    resumes only its own owner's checkpoints of the very same spec.
    """
    return f"train/{owner or OPERATOR}", f"{spec.name}-{spec.fingerprint()[:16]}"


def make_trainer(spec: JobSpec, cfg: Config, run_id: str | None, storage: str | None = None,
                 owner: str | None = None):
    """The `TorchTrainer` for a job; checkpoints under `<bucket>/<run_folder>` (or `<storage>/<run name>`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from peftray.train.worker import train_loop_per_worker

    # No secrets: Ray keeps the loop config; workers inherit the credentials from their node (or the state file).
    env = cfg.public_env()
    prefix, name = run_folder(spec, owner)
    run_config = RunConfig(
        name=name, storage_path=storage or f"{cfg.bucket}/{prefix}",
        storage_filesystem=checkpoint.storage_filesystem(cfg),
        failure_config=FailureConfig(max_failures=spec.training.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    kwargs = {"torch_config": torch_backend(spec.resources)} if spec.resources.use_tpu else {}
    loop_config = {"spec": spec.model_dump(mode="json"), "env": env, "run_id": run_id,
                   "checkpoint_root": f"{run_config.storage_path}/{run_config.name}"}
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                        scaling_config=scaling_config(spec.resources), run_config=run_config, **kwargs)


def run_job(spec: JobSpec | str | Path, config: Config | None = None, *, overrides: list[str] = (),
            job_id: str | None = None, owner: str | None = None, owner_is_admin: bool = False,
            in_process: bool = False, should_stop=None) -> TrainResult:
    """Train a job spec on Ray Train and register the adapter.

    Args:
        spec: a `JobSpec`, or a path / s3:// URI / YAML text for `load_spec`.
        config: endpoints (S3, MLflow, Ray); default `load_config()`.
        overrides: `key=value` overrides when `spec` is not a `JobSpec` yet.
        job_id: the control plane's job id, recorded as an MLflow tag.
        owner: the user the job runs for (set by the service): with the job name and the spec fingerprint,
            the run's identity; and the owner of a new adapter name (`owner_is_admin`: any name may be
            written). None: an operator running `peftray train` with the stack's credentials.
        in_process: train in this process (a warm runner's: `peftray.train.in_process`) instead of through
            Ray Train; only for one CPU worker (`in_process_eligible`).
        should_stop: with `in_process`, asked after every step; True cancels the job (`Cancelled`).

    Returns:
        The `TrainResult`: MLflow run id, registered model name + version, final metrics, adapter URI.

    Raises:
        ConfigError: a bad spec, missing data, wrong columns, too-short max_seq_len, use_gpu without GPUs, ...
            all raised before any MLflow run or worker exists.
        TrainingError: the workers failed more often than `training.max_failures`.
        ForbiddenError: `owner` may not register under the spec's model name (before anything started).
    """
    from peftray.registry.client import mlflow_client
    from peftray.registry.owners import check_owner

    now = time.time()  # a warm runner's process started long before this job: the job starts here
    marks = {"driver_start": now if in_process else DRIVER_START, "run_job": now}
    spec = spec if isinstance(spec, JobSpec) else load_spec(spec, list(overrides))
    cfg = config or load_config()
    spec = _absolute_paths(spec)
    if in_process and not in_process_eligible(spec):
        raise PeftrayError(f"job {spec.name} needs Ray Train (more than one worker, or an accelerator)")
    if not in_process:
        connect_ray(cfg)
    marks["ray_connected"] = time.time()
    fingerprint = preflight(spec, cfg, cluster=not in_process)
    if owner is not None:  # fail before training, not after: the name may be someone else's
        check_owner(spec.model_name, owner, is_admin=owner_is_admin, action="register a new version of it",
                    config=cfg)
    marks["preflight"] = time.time()
    client = mlflow_client(cfg)
    from peftray.train.tracking import close_run, open_run

    run_id = open_run(client, spec, fingerprint, job_id, owner)
    marks["run_opened"] = time.time()
    result = None
    try:
        if in_process:
            from peftray.train.in_process import fit_in_process

            prefix, name = run_folder(spec, owner)
            result = fit_in_process(spec, cfg, run_id, f"{cfg.bucket}/{prefix}/{name}",
                                    should_stop or (lambda: False))
        else:
            result = make_trainer(spec, cfg, run_id, owner=owner).fit()
        marks["fit_returned"] = time.time()
        out = _register(spec, cfg, run_id, result, fingerprint, (owner, owner_is_admin))
    except BaseException:
        close_run(client, run_id, ok=False)
        raise
    finally:
        if getattr(result, "workdir", None) is not None:
            import shutil

            shutil.rmtree(result.workdir, ignore_errors=True)
    close_run(client, run_id, ok=True)
    marks["done"] = time.time()
    out.extra["timings"] = {**marks, **out.extra.get("timings", {})}
    return out


def _register(spec: JobSpec, cfg: Config, run_id: str, result, fingerprint: str,
              owner: tuple[str | None, bool]) -> TrainResult:
    from peftray.registry import register_adapter

    if result.error is not None or result.checkpoint is None:
        raise TrainingError(f"job {spec.name} failed: {result.error or 'no final checkpoint was reported'}")
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    timings = {k[len(TIMING):]: metrics.pop(k) for k in [k for k in metrics if k.startswith(TIMING)]}
    registry_metrics = {k: v for k, v in metrics.items() if k.startswith("eval_")}
    registry_metrics["train_loss"] = metrics.get("loss", float("nan"))
    registry_metrics = {k: v for k, v in registry_metrics.items() if v == v}  # drop NaN
    timings["registering"] = time.time()
    with result.checkpoint.as_directory() as folder:
        version = register_adapter(
            Path(folder) / "adapter", spec.model_name, base_model=spec.base_model.path,
            base_revision=spec.base_model.revision, run_id=run_id, job_name=spec.name, metrics=registry_metrics,
            tags=_version_tags(spec), dataset_fingerprint=fingerprint, description=spec.description,
            owner=owner[0], owner_is_admin=owner[1], config=cfg)
    out = TrainResult(run_id=run_id, model_name=version.name, version=version.version, metrics=metrics,
                      adapter_uri=version.tags.get("peftray.s3_uri") or version.source, job_name=spec.name,
                      extra={"timings": timings})
    timings["registered"] = time.time()
    _promote(spec, cfg, out)
    return out


def _version_tags(spec: JobSpec) -> dict[str, str]:
    t = spec.training
    tags = {"hp.learning_rate": repr(t.learning_rate), "hp.batch_size": str(t.batch_size),
            "hp.num_workers": str(spec.resources.num_workers), "hp.precision": t.precision,
            "hp.steps": str(t.max_steps or ""), "hp.epochs": str(t.epochs or ""), "task": spec.task,
            "objective": t.objective}
    if t.objective != "sft":
        tags["hp.beta"] = repr(t.preference_beta)
    if t.objective == "dpo":
        tags.update({"hp.loss_type": t.loss_type, "hp.reference": t.reference})
    if spec.quantization:
        tags.update({"method": "qlora" if spec.method in ("lora", "dora") else spec.method,
                     "hp.quantization": spec.quantization})
    return {**tags, **spec.registry.tags}


def _promote(spec: JobSpec, cfg: Config, out: TrainResult) -> None:
    promo = spec.registry.promote
    if promo is None:
        return
    from peftray.registry import promote

    try:
        promote(out.model_name, out.version, promo.alias, gate=promo.gate, actor="peftray-train",
                reason=f"job {spec.name}", config=cfg)
        out.promoted_alias = promo.alias
    except GateError as exc:  # the adapter is trained and registered; only the alias did not move
        out.promotion_error = str(exc)
