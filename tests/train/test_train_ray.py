"""Adapter training end to end on the session stack: real Ray Train workers, real MLflow, real S3.

One 2-worker job is shared by several checks (module fixture) to keep the suite within its time budget.
"""

from __future__ import annotations

import math

import pytest
import torch

from peftray.errors import ConfigError
from peftray.jobspec import load_spec

pytestmark = [pytest.mark.stack, pytest.mark.slow]

TINY_OVERRIDES = ["training.max_steps=12", "training.learning_rate=1e-2", "adapter.target_modules=all-linear",
                  "training.lr_scheduler=constant", "training.warmup_steps=0", "training.batch_size=4",
                  "training.eval_every=6", "training.checkpoint_every=6", "resources.num_workers=2",
                  "registry.promote=null"]


def _tiny_spec(tiny_model, name, *extra):
    return load_spec("jobs/tiny-lora-instruct.yaml",
                     [f"base_model.path={tiny_model}", f"name={name}", f"registry.model_name={name}",
                      *TINY_OVERRIDES, *extra])


@pytest.fixture(scope="module")
def two_worker_job(stack, ray_session, tiny_model, tmp_path_factory):
    from peftray.train import run_job

    name = "tw" + __import__("uuid").uuid4().hex[:8]
    spec = _tiny_spec(tiny_model, name, "registry.tags={team: infra}")
    return spec, run_job(spec, stack)


def _client(stack):
    from peftray.registry.client import mlflow_client

    return mlflow_client(stack)


def test_two_worker_job_learns_and_registers(two_worker_job, stack):
    from peftray.registry import list_versions

    spec, result = two_worker_job
    losses = [m.value for m in sorted(_client(stack).get_metric_history(result.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses  # the training loss falls
    versions = list_versions(spec.model_name, config=stack)
    assert [v.version for v in versions] == [result.version] == [1]
    v = versions[0]
    assert v.base_model == spec.base_model.path and v.method == "lora" and v.job_name == spec.name
    assert v.dataset_fingerprint.startswith("sha256:") and v.files and v.run_id == result.run_id
    assert v.tags["team"] == "infra" and v.tags["hp.learning_rate"] == "0.01" and v.tags["hp.num_workers"] == "2"
    assert v.metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"])
    run = _client(stack).get_run(result.run_id)
    assert run.data.params["training.learning_rate"] == "0.01" and run.info.status == "FINISHED"


def _hf_eval_loss(adapter_dir, spec, tiny_model):
    """Eval loss of the adapter loaded by HF PEFT, computed example by example with explicit cross-entropy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftray.data import prepare_data

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in prepare_data(spec, tok).eval:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1].double()
            labels = torch.tensor(ex["labels"][1:])
            keep = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def test_registered_artifacts_load_in_hf_peft_and_reproduce_eval_loss(two_worker_job, stack, tiny_model, tmp_path):
    spec, result = two_worker_job
    assert result.adapter_uri.startswith("s3://")
    local = tmp_path / "adapter"
    stack.s3fs().get(result.adapter_uri.removeprefix("s3://") + "/", str(local) + "/", recursive=True)
    assert (local / "adapter_model.safetensors").exists()
    assert _hf_eval_loss(local, spec, tiny_model) == pytest.approx(result.metrics["eval_loss"], rel=1e-4)


def test_two_workers_match_one_worker_with_double_batch(two_worker_job, stack, tiny_model):
    """The same loop in one process with batch 2b gives the 2-worker x b loss curve (DDP + global token mean)."""
    from peftray.train.local import run_local

    spec, result = two_worker_job
    ray_curve = [m.value for m in sorted(_client(stack).get_metric_history(result.run_id, "loss"), key=lambda m: m.step)]
    one = run_local(load_spec(spec.model_dump(mode="json"), ["resources.num_workers=1", "training.batch_size=8"]))
    local_curve = [m["loss"] for m in one.history]
    torch.testing.assert_close(torch.tensor(local_curve), torch.tensor(ray_curve), rtol=0, atol=2e-3)


def test_worker_crash_resumes_from_checkpoint_and_registers_once(stack, ray_session, tiny_model, unique_name,
                                                                 monkeypatch):
    from peftray.registry import list_versions
    from peftray.train import run_job

    spec = _tiny_spec(tiny_model, unique_name, "training.max_steps=6", "training.checkpoint_every=2",
                      "training.eval_every=null")
    monkeypatch.setenv("PEFTRAY_TEST_CRASH_AT_STEP", "3")  # rank 1 os._exit()s before its 4th step
    result = run_job(spec, stack)
    monkeypatch.delenv("PEFTRAY_TEST_CRASH_AT_STEP")
    client = _client(stack)
    resumed = [m.value for m in client.get_metric_history(result.run_id, "resumed_from_step")]
    assert resumed == [2.0]  # restarted from the step-2 checkpoint, not from step 0
    assert result.metrics["step"] == 6.0
    assert [v.version for v in list_versions(spec.model_name, config=stack)] == [result.version]

    again = run_job(spec, stack)  # the same job name again: resumes from its final checkpoint, registers nothing new
    resumed = sorted(m.value for m in client.get_metric_history(result.run_id, "resumed_from_step"))
    assert again.run_id == result.run_id and again.version == result.version and resumed == [2.0, 6.0]
    assert [v.version for v in list_versions(spec.model_name, config=stack)] == [result.version]


def test_minilm_seq_cls_learns_the_shipped_reviews(stack, ray_session, minilm_model, unique_name):
    from peftray.train import run_job

    spec = load_spec("jobs/minilm-sentiment.yaml", [
        f"base_model.path={minilm_model}", f"name={unique_name}", "resources.num_workers=1", "training.epochs=null",
        "training.max_steps=12", "training.learning_rate=5e-3", "training.lr_scheduler=constant",
        "training.eval_every=null"])
    result = run_job(spec, stack)
    assert result.metrics["eval_accuracy"] >= 0.8  # 60 held-out rows, 2 balanced classes: chance is 0.5
    assert result.promoted_alias == "production"  # the spec's gate: eval_accuracy >= 0.8


@pytest.mark.parametrize("override, needle", [
    (["training.lr=1"], "unknown field `training.lr`"),
    (["dataset.source=jobs/data/missing.jsonl"], "does not exist"),
    (["dataset.prompt_field=question"], "its columns are prompt, response"),
    (["dataset.max_seq_len=4"], "max_seq_len` 4"),
    (["resources.use_gpu=true"], "`resources.use_gpu` is true, but the Ray cluster has no GPUs"),
])
def test_bad_specs_fail_fast_and_leave_nothing(stack, ray_session, tiny_model, unique_name, override, needle):
    from peftray.registry import list_adapters
    from peftray.train import run_job
    from peftray.train.tracking import find_run

    overrides = [f"base_model.path={tiny_model}", f"name={unique_name}", f"registry.model_name={unique_name}", *override]
    with pytest.raises(ConfigError) as info:
        run_job("jobs/tiny-lora-instruct.yaml", stack, overrides=overrides)
    assert needle in str(info.value)
    assert find_run(_client(stack), unique_name) is None
    assert unique_name not in {a.name for a in list_adapters(config=stack)}


def _resumed(client, run_id) -> list[float]:
    return [m.value for m in client.get_metric_history(run_id, "resumed_from_step")]


def test_run_identity_is_owner_name_and_spec(stack, ray_session, tiny_model, unique_name):
    """Issue 14 item 2: another user's job of the same name, or the same name with a changed spec, never
    resumes a checkpoint or MLflow run that is not its own; nor does it write into another user's adapter."""
    from peftray.errors import ForbiddenError
    from peftray.registry import fetch, list_versions
    from peftray.train import run_job
    from peftray.train.tracking import find_run

    spec = _tiny_spec(tiny_model, unique_name, "training.max_steps=2", "training.checkpoint_every=1",
                      "training.eval_every=null", "resources.num_workers=1")
    alice = run_job(spec, stack, owner="alice")
    client = _client(stack)
    # bob, same name and the very spec: alice's adapter name is not his to write (refused before training)
    with pytest.raises(ForbiddenError, match="belongs to 'alice'"):
        run_job(spec, stack, owner="bob")
    assert find_run(client, unique_name, owner="bob") is None
    # carol, an admin, may write it: her run is her own, trained from step 0, not resumed from alice's checkpoint
    carol = run_job(spec, stack, owner="carol", owner_is_admin=True)
    assert carol.run_id != alice.run_id and _resumed(client, carol.run_id) == []
    known = {v.version for v in list_versions(spec.model_name, config=stack)}
    # alice again, a changed spec under the same name: a new run trained from step 0, a new version
    changed = spec.model_copy(update={"training": spec.training.model_copy(update={"learning_rate": 3e-2})})
    again = run_job(changed, stack, owner="alice")
    assert again.run_id != alice.run_id and _resumed(client, again.run_id) == [] and again.version not in known
    assert client.get_run(again.run_id).data.params["training.learning_rate"] == "0.03"
    first = (fetch(f"{spec.model_name}/1", config=stack) / "adapter_model.safetensors").read_bytes()
    second = (fetch(f"{spec.model_name}/{again.version}", config=stack) / "adapter_model.safetensors").read_bytes()
    assert first != second
    # alice, the first spec once more: her own run and checkpoint, resumed after its last step; nothing new
    same = run_job(spec, stack, owner="alice")
    assert same.run_id == alice.run_id and same.version == 1 and _resumed(client, alice.run_id) == [2.0]


def test_non_finite_loss_fails_the_job_naming_the_step(stack, ray_session, tiny_model, unique_name):
    """Issue 14 item 5: a NaN loss (here from a huge but finite learning rate) fails the job; nothing registered."""
    from peftray.registry import list_adapters
    from peftray.train import run_job
    from peftray.train.tracking import find_run

    spec = _tiny_spec(tiny_model, unique_name, "training.max_steps=4", "training.learning_rate=1e38",
                      "training.max_grad_norm=null", "training.eval_every=null", "training.max_failures=0",
                      "resources.num_workers=1")
    with pytest.raises(Exception, match=r"non-finite (loss|gradient) at step 2"):
        run_job(spec, stack, owner="alice")
    assert find_run(_client(stack), unique_name).info.status == "FAILED"
    assert unique_name not in {a.name for a in list_adapters(config=stack)}
