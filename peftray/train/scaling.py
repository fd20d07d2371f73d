"""From the spec's `resources` section to Ray Train's ScalingConfig, and the checks that go with it."""

from __future__ import annotations

from typing import Any

from peftray.errors import ConfigError
from peftray.jobspec import ResourcesSpec


def scaling_config(resources: ResourcesSpec):
    """The `ray.train.ScalingConfig` for a job's `resources`.

    CPU: one worker per `num_workers`, `cpus_per_worker` each. GPU: `use_gpu` with `gpus_per_worker`
    (default 1) and optionally `accelerator_type` (e.g. `A100`). TPU: Ray Train's TPU support, `use_tpu`
    with `topology` and `accelerator_type` (e.g. `2x2x1`, `TPU-V6E`), which picks the TPU hosts of one slice.

    Raises:
        ConfigError: a combination Ray Train refuses (the message quotes Ray's reason).
    """
    from ray.train import ScalingConfig

    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    kwargs: dict[str, Any] = {"num_workers": resources.num_workers, "placement_strategy": resources.placement_strategy}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker or 1
        kwargs["use_gpu"] = True
    if resources.use_tpu:
        kwargs.update(use_tpu=True, topology=resources.topology)
        per_worker.update(_tpu_host(resources))
    if resources.accelerator_type:
        kwargs["accelerator_type"] = resources.accelerator_type
    try:
        return ScalingConfig(resources_per_worker=per_worker, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"`resources`: Ray Train refuses this combination: {exc}") from None


def _tpu_host(resources: ResourcesSpec) -> dict[str, float]:
    """One Ray Train worker per TPU host, holding all of that host's chips: `num_workers` must be the number
    of hosts in the slice (e.g. 4 for a v6e 4x4 slice of 4 hosts x 4 chips, 1 for a v4 2x2x1)."""
    if not (resources.topology and resources.accelerator_type):
        return {"TPU": 1}  # no slice named: one chip per worker, placed wherever TPUs are
    from ray.util.tpu import get_tpu_worker_resources

    try:
        hosts, per_host = get_tpu_worker_resources(topology=resources.topology,
                                                   accelerator_type=resources.accelerator_type)
    except ValueError as exc:
        raise ConfigError(f"`resources.topology` {resources.topology!r} with `resources.accelerator_type` "
                          f"{resources.accelerator_type!r}: {exc}") from None
    if resources.num_workers != hosts:
        raise ConfigError(f"`resources.num_workers` is {resources.num_workers}, but a {resources.accelerator_type} "
                          f"{resources.topology} slice has {hosts} host(s) of {per_host['TPU']:g} chips; peftray runs "
                          f"one worker per host, so set resources.num_workers={hosts}")
    return {"TPU": float(per_host["TPU"])}


def torch_backend(resources: ResourcesSpec):
    """The Ray Train torch backend config: torch_xla's for TPU, the default (gloo on CPU, nccl on GPU) else."""
    if resources.use_tpu:
        from ray.train.torch.xla import TorchXLAConfig

        return TorchXLAConfig()
    return None


def check_cluster(resources: ResourcesSpec, cluster: dict[str, float]) -> None:
    """Refuse, before anything starts, a job the cluster has no accelerator for.

    Args:
        resources: the spec's resources section.
        cluster: `ray.cluster_resources()` of the cluster the job would run on.

    Raises:
        ConfigError: `use_gpu` on a cluster without GPUs, `use_tpu` without TPUs.
    """
    for flag, key, what in (("use_gpu", "GPU", "GPUs"), ("use_tpu", "TPU", "TPUs")):
        if getattr(resources, flag) and cluster.get(key, 0) <= 0:
            raise ConfigError(
                f"`resources.{flag}` is true, but the Ray cluster has no {what} (its resources: "
                f"{_summary(cluster)}). Set resources.{flag}=false to train on CPUs, or submit to a cluster "
                f"with {what}")
    need = resources.gpus_per_worker or 1
    if resources.use_gpu and cluster.get("GPU", 0) < need:
        raise ConfigError(f"`resources.gpus_per_worker` is {need}, more than the cluster's {cluster.get('GPU')} GPUs")


def _summary(cluster: dict[str, float]) -> str:
    keys = [k for k in sorted(cluster) if not k.startswith(("node:", "memory", "object_store")) and "group" not in k]
    return ", ".join(f"{k}={cluster[k]:g}" for k in keys) or "none"
