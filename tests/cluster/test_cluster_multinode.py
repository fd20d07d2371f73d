"""A real two-node Ray cluster on this machine: training across nodes survives losing one."""

from __future__ import annotations

import json
import uuid

import pytest

from peftray.stack import procs
from ray_nodes import Driver, alive_nodes, start_node, wait_for

TOTAL_STEPS, CHECKPOINT_EVERY, STEP_SECONDS = 30, 5, 0.4


def _committed_checkpoint(fs, prefix: str, name: str) -> bool:
    """Ray Train has recorded a checkpoint as the run's latest (uploaded is not enough: the controller
    registers it only once every worker has reported that step)."""
    path = f"{prefix}/ray/{name}/checkpoint_manager_snapshot.json"
    fs.invalidate_cache()
    return fs.exists(path) and json.loads(fs.cat_file(path)).get("latest_checkpoint_result") is not None


def _placements(fs, prefix: str) -> dict[str, str]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[1]: fs.cat_file(p).decode() for p in fs.find(f"{prefix}/placements")}


@pytest.mark.slow
def test_training_spans_two_nodes_and_survives_losing_one(ft_cluster, tmp_path):
    _, cfg = ft_cluster
    head_id = alive_nodes(cfg)[0]["nodeId"]
    node_b = start_node(cfg, "node-b", num_cpus=1, resources={"node_b": 1}, tmp=tmp_path)
    name = f"mn{uuid.uuid4().hex[:8]}"
    prefix = f"{cfg.bucket}/cluster-tests/{name}"
    fs = cfg.s3fs()
    try:
        wait_for(lambda: len(alive_nodes(cfg)) == 2, "node B joining the cluster", timeout=60)
        driver = Driver(cfg, "driver_train.py", [name, str(TOTAL_STEPS), str(CHECKPOINT_EVERY), str(STEP_SECONDS)],
                        tmp_path)
        # Both workers placed and a first checkpoint in S3: now the run is mid-way.
        wait_for(lambda: _committed_checkpoint(fs, prefix, name), "first checkpoint in S3", timeout=120,
                 context=driver.output)
        first = _placements(fs, prefix)
        assert sorted(k.split("-pid")[0] for k in first) == ["start0000-rank0", "start0000-rank1"]
        assert len(set(first.values())) == 2, f"both workers landed on one node: {first}"
        node_b_id = next(n for n in first.values() if n != head_id)
        procs.stop(node_b.proc)  # the whole process tree: raylet, its workers, the training worker on it
        result = driver.result(timeout=240)
    finally:
        node_b.stop()
        if "driver" in locals():
            driver.kill()
    assert result["metrics"]["step"] == TOTAL_STEPS - 1
    later = {k: v for k, v in _placements(fs, prefix).items() if k not in first}
    assert later, "the worker group was never restarted"
    resumed = sorted({int(k[5:9]) for k in later})
    assert resumed[0] > 0 and resumed[0] % CHECKPOINT_EVERY == 0, f"resumed at {resumed}, not from a checkpoint"
    assert node_b_id not in later.values() and set(later.values()) == {head_id}
    assert alive_nodes(cfg) and all(n["nodeId"] != node_b_id for n in alive_nodes(cfg))
    assert result["checkpoint"].startswith(f"{prefix}/ray/{name}/checkpoint_")
    _check_registered(cfg, result)


def _check_registered(cfg, result: dict) -> None:
    """The registered version points at the final checkpoint's adapter, byte for byte."""
    from mlflow import MlflowClient, artifacts

    cfg.apply_env()
    version = MlflowClient(cfg.mlflow_tracking_uri).get_model_version(result["model_name"], result["version"])
    assert version.run_id == result["run_id"]
    local = artifacts.download_artifacts(artifact_uri=version.source, tracking_uri=cfg.mlflow_tracking_uri)
    with open(f"{local}/adapter.safetensors", "rb") as fh:
        registered = fh.read()
    assert registered == cfg.s3fs().cat_file(f"{result['checkpoint']}/adapter.safetensors")
