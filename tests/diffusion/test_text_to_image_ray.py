"""text_to_image end to end on the session stack: a Ray Train worker, the MLflow run with its sample grids,
the registered adapter folder in the HF PEFT and diffusers layouts."""

from __future__ import annotations

import uuid

import pytest

from peftray.jobspec import load_spec

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_text_to_image_job_trains_registers_and_logs_sample_grids(stack, ray_session, tiny_sd):
    from peftray.registry.client import mlflow_client
    from peftray.train import run_job

    name = "sd" + uuid.uuid4().hex[:8]
    spec = load_spec("jobs/tiny-sd-lora.yaml", [
        f"base_model.path={tiny_sd}", f"name={name}", f"registry.model_name={name}", "training.max_steps=4",
        "training.eval_every=2", "training.checkpoint_every=2", "registry.promote=null"])
    result = run_job(spec, stack)
    assert result.version >= 1 and result.metrics["eval_loss"] > 0
    client = mlflow_client(stack)
    samples = sorted(a.path for a in client.list_artifacts(result.run_id, "samples"))
    assert samples == ["samples/step_000002.png", "samples/step_000004.png"]
    fs = stack.s3fs()
    files = {p.rsplit("/", 1)[-1] for p in fs.ls(result.adapter_uri.removeprefix("s3://"))}
    assert {"adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"} <= files
