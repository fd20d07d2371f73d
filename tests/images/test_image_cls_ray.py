"""image_cls end to end on the session stack: the base model and the class folders read from S3, a Ray Train
worker, the registered adapter (LoRA + classifier, HF PEFT layout) promoted by an accuracy gate."""

from __future__ import annotations

import json
import uuid

import pytest

from peftray.jobspec import load_spec

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_image_cls_job_from_s3_trains_registers_and_passes_its_gate(stack, ray_session, tiny_vit):
    from peftray.train import run_job

    name = "vit" + uuid.uuid4().hex[:8]
    fs = stack.s3fs()
    prefix = f"{stack.bucket}/data/{name}/colours"
    fs.put("jobs/data/colours/", prefix + "/", recursive=True)
    base = f"{stack.bucket}/models/{name}/tiny-vit"
    fs.put(f"{tiny_vit}/", base + "/", recursive=True)
    spec = load_spec("jobs/tiny-vit-lora.yaml", [
        f"base_model.path=s3://{base}", f"name={name}", f"registry.model_name={name}", f"dataset.source=s3://{prefix}"])
    result = run_job(spec, stack)
    assert result.metrics["eval_accuracy"] >= 0.9, result.metrics
    assert result.promoted_alias == "staging", result.promotion_error  # gate: eval_accuracy max, threshold 0.9
    root = result.adapter_uri.removeprefix("s3://")
    config = json.loads(fs.cat_file(f"{root}/adapter_config.json"))
    assert config["task_type"] is None and config["modules_to_save"] == ["classifier"]
    assert fs.exists(f"{root}/adapter_model.safetensors")
