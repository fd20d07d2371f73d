"""The Ray cluster launcher configs in cluster/*.yaml: valid for `ray up`, secure, and on peftray's version."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from cluster_checks import (
    ROOT, index_install_problems, project_version, text_secret_problems, wheel_name,
)

LAUNCHER_YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_both_clouds_are_there():
    assert {p.name for p in LAUNCHER_YAMLS} >= {"aws-gpu.yaml", "gcp-tpu.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_validates_against_rays_schema(path):
    config = _load(path)
    jsonschema.validate(config, SCHEMA)
    # Ray's own validation after it fills in defaults, as `ray up` does (no cloud call).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_schema_check_is_not_vacuous():
    config = _load(ROOT / "cluster" / "aws-gpu.yaml")
    config["available_node_types"]["gpu_1x_a10g"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, SCHEMA)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_token_auth_and_private_dashboard(path):
    config = _load(path)
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    for name, cmd in (("head", head), ("worker", worker)):
        assert "RAY_AUTH_MODE=token" in cmd, f"{path.name}: {name} starts Ray without token auth"
        assert "RAY_AUTH_TOKEN_PATH=" in cmd, f"{path.name}: {name} has no token file"
    assert "--dashboard-host=127.0.0.1" in head, "dashboard must stay on loopback (reach it with `ray dashboard`)"
    # The token and env files come from the user's machine, never from the repository; the only other mount
    # is the wheel built from the checkout.
    sources = [s for s in config["file_mounts"].values() if s != _wheel_mount(config)[1]]
    assert sources and all(s.startswith("~/.peftray/") for s in sources), sources
    assert text_secret_problems(path.read_text(), path.name) == []


def _wheel_mount(config: dict) -> tuple[str, str]:
    """(remote, local) of the file mount that ships peftray's wheel."""
    (mount,) = [(r, l) for r, l in config["file_mounts"].items() if l.endswith(".whl")]
    return mount


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_every_node_installs_the_wheel_built_from_the_checkout(path):
    """`make wheel` then `ray up` works with no index holding peftray: the nodes install the shipped file."""
    config = _load(path)
    remote, local = _wheel_mount(config)
    assert local == f"dist/{wheel_name(project_version())}", "the wheel `make wheel` writes, at pyproject's version"
    assert Path(remote).name == Path(local).name and remote.startswith("/")
    setup = config["setup_commands"]  # setup_commands run on the head and on every worker
    installs = [c for c in setup if re.search(r"\bpip3? install\b", c)]
    assert installs and any(re.search(rf"pip install [^;&|]*[\"']?{re.escape(remote)}(\[[\w,]+\])?[\"']?", c)
                            for c in installs), installs
    assert index_install_problems("\n".join(config["setup_commands"] + config["worker_setup_commands"]
                                            + config["head_setup_commands"]), path.name) == []


def test_aws_gpu_worker_types_autoscale():
    config = _load(ROOT / "cluster" / "aws-gpu.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["node_config"]["InstanceType"].startswith(("m", "c"))
    gpu_types = {n: t for n, t in config["available_node_types"].items() if t["resources"].get("GPU")}
    assert len(gpu_types) >= 2
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, f"{name} must scale from zero"


def test_gcp_tpu_worker_types_are_valid_tpus():
    from ray._private.accelerators import TPUAcceleratorManager

    config = _load(ROOT / "cluster" / "gcp-tpu.yaml")
    tpus = {n: t for n, t in config["available_node_types"].items() if "acceleratorType" in t["node_config"]}
    assert tpus
    for name, t in tpus.items():
        accel = t["node_config"]["acceleratorType"]
        assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(accel), f"{name}: {accel}"
        assert t["node_config"]["runtimeVersion"]
        assert t["resources"]["TPU"] == 4  # v4 VMs hold 4 chips each
    assert "torch_xla" in " ".join(config["worker_setup_commands"])
