"""A real two-node Ray cluster on this machine: a peftray training job spans both nodes and survives losing one.

The job is the real one (`python -m peftray.train --spec ...`, the entrypoint the control plane launches):
LoRA on the tiny Llama, 2 Ray Train workers spread over the head and node B, checkpoints in the stack's S3,
the adapter registered in its MLflow. Node B is killed (its whole process tree) after the first checkpoint.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml

from cluster_checks import ROOT
from ray_nodes import Driver, actors_of_class, head_node_id, start_node, wait_for

MAX_STEPS, CHECKPOINT_EVERY = 40, 5


def _job_spec(path, name: str, base_model) -> None:
    path.write_text(yaml.safe_dump({
        "name": name,
        "base_model": {"path": str(base_model)},
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "dataset": {"source": str(ROOT / "jobs" / "data" / "tiny_instruct.jsonl"), "format": "instruction",
                    "max_seq_len": 64, "eval_fraction": 0.1},
        "training": {"max_steps": MAX_STEPS, "learning_rate": 3.0e-3, "batch_size": 2,
                     "checkpoint_every": CHECKPOINT_EVERY, "max_failures": 3},
        # SPREAD, not STRICT_SPREAD: the workers land on different nodes while both live, and the restarted
        # group may still be placed on the one node left after the other dies.
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "SPREAD"},
        "registry": {"model_name": name, "tags": {"test": "cluster-multinode"}},
    }))


def _committed_checkpoint(fs, storage: str) -> bool:
    """Ray Train has recorded a checkpoint as the run's latest (uploaded is not enough: the controller
    registers it only once every worker has reported that step)."""
    fs.invalidate_cache()
    path = f"{storage}/checkpoint_manager_snapshot.json"
    return fs.exists(path) and json.loads(fs.cat_file(path)).get("latest_checkpoint_result") is not None


@pytest.mark.slow
def test_training_spans_two_nodes_and_survives_losing_one(ft_cluster, tiny_model, tmp_path):
    cfg = ft_cluster.cfg
    head_id = head_node_id(cfg)
    node_b = start_node(cfg, "node-b", num_cpus=1, resources={"node_b": 1}, tmp=tmp_path)
    name = f"mn{uuid.uuid4().hex[:8]}"
    _job_spec(tmp_path / "job.yaml", name, tiny_model)
    from peftray.jobspec import load_spec
    from peftray.train.run import run_folder

    storage, fs = f"{cfg.bucket}/" + "/".join(run_folder(load_spec(str(tmp_path / "job.yaml")), None)), cfg.s3fs()
    driver = None
    try:
        node_b_id = node_b.node_id
        driver = Driver(cfg, ["-m", "peftray.train", "--spec", str(tmp_path / "job.yaml")], tmp_path)
        wait_for(lambda: _committed_checkpoint(fs, storage), "a committed checkpoint in S3", timeout=240,
                 context=driver.output)
        first = {a["actor_id"]: a["node_id"] for a in actors_of_class(cfg, "RayTrainWorker") if a["state"] == "ALIVE"}
        assert sorted(first.values()) == sorted([head_id, node_b_id]), "the 2 workers must be on different nodes"
        node_b.stop()  # raylet, its workers and the training worker on it: a lost machine
        result = driver.result(timeout=300)
    finally:
        node_b.stop()
        if driver:
            driver.kill()
    # The job finished, on the node that was left, resumed from a checkpoint rather than from step 0.
    assert result["metrics"]["step"] == MAX_STEPS
    replacements = {a["actor_id"]: a["node_id"] for a in actors_of_class(cfg, "RayTrainWorker")
                    if a["actor_id"] not in first}
    assert len(replacements) >= 2 and set(replacements.values()) == {head_id}, replacements
    _check_resumed_and_registered(cfg, result)


def _check_resumed_and_registered(cfg, result: dict) -> None:
    from mlflow import MlflowClient, artifacts

    client = MlflowClient(cfg.mlflow_tracking_uri)  # the session stack's MLflow (credentials already exported)
    resumed = [int(m.value) for m in client.get_metric_history(result["run_id"], "resumed_from_step")]
    assert resumed and all(s > 0 and s % CHECKPOINT_EVERY == 0 for s in resumed), resumed
    version = client.get_model_version(result["model_name"], str(result["version"]))
    assert version.run_id == result["run_id"]
    local = artifacts.download_artifacts(artifact_uri=version.source, tracking_uri=cfg.mlflow_tracking_uri)
    files = {p.name for p in Path(local).rglob("*")}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
