"""Job spec `resources` -> Ray Train ScalingConfig for GPU and TPU clusters (objects built, nothing run)."""

from __future__ import annotations

import pytest

from cluster_checks import ROOT
from peftray.jobspec import load_spec
from peftray.train.scaling import scaling_config

BASE = {"name": "s", "base_model": "m", "dataset": {"source": "d.jsonl", "format": "text"}}


def _resources(**kw):
    return load_spec({**BASE, "resources": kw}).resources


def test_gpu_workers():
    sc = scaling_config(_resources(num_workers=4, use_gpu=True, gpus_per_worker=1, cpus_per_worker=4,
                                   accelerator_type="A100", placement_strategy="SPREAD"))
    assert (sc.num_workers, sc.use_gpu, sc.use_tpu) == (4, True, False)
    assert sc.resources_per_worker == {"CPU": 4, "GPU": 1}
    assert sc.accelerator_type == "A100" and sc.placement_strategy == "SPREAD"


def test_cpu_workers_default_to_pack():
    sc = scaling_config(_resources(num_workers=2))
    assert (sc.num_workers, sc.use_gpu, sc.placement_strategy) == (2, False, "PACK")
    assert sc.resources_per_worker == {"CPU": 1}


def test_tpu_slice_matches_the_kuberay_tpu_group():
    """The RayCluster's tpu-v6e-4x4 group: 4 hosts x 4 chips; a spec asking for that slice fits it."""
    from ray.util.tpu import get_tpu_worker_resources

    sc = scaling_config(_resources(num_workers=4, use_tpu=True, topology="4x4", accelerator_type="TPU-V6E"))
    assert (sc.use_tpu, sc.topology, sc.accelerator_type, sc.num_workers) == (True, "4x4", "TPU-V6E", 4)
    hosts, per_host = get_tpu_worker_resources(topology="4x4", accelerator_type="TPU-V6E")
    assert sc.num_workers == hosts and per_host["TPU"] == 4 and sc.resources_per_worker["TPU"] == 4


def test_tpu_workers_must_match_the_slice_hosts():
    from peftray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"num_workers` is 16.*4 host\(s\) of 4 chips.*num_workers=4"):
        scaling_config(_resources(num_workers=16, use_tpu=True, topology="4x4", accelerator_type="TPU-V6E"))
    with pytest.raises(ConfigError, match="topology"):
        scaling_config(_resources(num_workers=1, use_tpu=True, topology="3x7", accelerator_type="TPU-V6E"))


def test_example_tpu_job_builds():
    spec = load_spec(str(ROOT / "jobs" / "tpu-lora.yaml"))
    sc = scaling_config(spec.resources)
    assert sc.use_tpu and sc.topology == spec.resources.topology


@pytest.mark.parametrize("bad", [dict(use_gpu=True, use_tpu=True), dict(topology="2x2")])
def test_contradictions_are_refused(bad):
    from peftray.errors import ConfigError

    with pytest.raises(ConfigError):
        scaling_config(_resources(**bad))
