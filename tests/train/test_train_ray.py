"""Adapter training end to end on the session stack: real Ray Train workers, real MLflow, real S3.

One 2-worker job is shared by several checks (module fixture) to keep the suite within its time budget.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import re
import signal
import threading
import time

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


def _our_train_workers(ray_session) -> list:
    """Alive Ray Train worker actors of this driver's job (the controller this process started creates them)."""
    from ray.util.state import list_actors

    job_id = ray_session.get_runtime_context().get_job_id()
    address = ray_session.get_runtime_context().gcs_address  # this cluster's, not another Ray on the machine
    return [a for a in list_actors(address=address,
                                   filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                   detail=True, raise_on_missing_output=False)
            if a.job_id == job_id and a.pid]


def _checkpoint_steps(stack, spec) -> list[int]:
    from peftray.train.run import run_folder

    fs = stack.s3fs()
    fs.invalidate_cache()
    # the job's run folder is `<name>-<fingerprint>` of the spec as run_job resolved it (absolute data paths)
    prefix, run_name = run_folder(spec, None)
    name = run_name.rsplit("-", 1)[0]
    found = fs.glob(f"{stack.bucket}/{prefix}/{name}-*/checkpoint_*")
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in found)
    return sorted(int(m.group(1)) for m in map(re.compile(r"checkpoint_(\d+)").fullmatch, names) if m)


def _kill_a_worker_after_checkpoints(stack, ray_session, spec, job_over: threading.Event) -> int:
    """SIGKILL one training worker from outside (as the OOM killer would) once a checkpoint is surely registered.

    A worker's report uploads its checkpoint, then waits until Ray Train's controller took the previous report:
    so when the checkpoint of step 6 is in S3, the one of step 2 is registered, whatever the machine's load.
    """
    deadline = time.monotonic() + 300
    while not any(step >= 6 for step in _checkpoint_steps(stack, spec)):
        assert not job_over.is_set(), "the job ended before it could be interrupted"
        assert time.monotonic() < deadline, "no checkpoint of step 6 appeared"
        time.sleep(0.2)
    workers = _our_train_workers(ray_session)
    assert len(workers) == 2, workers
    victim = max(workers, key=lambda a: a.pid)
    os.kill(victim.pid, signal.SIGKILL)
    return victim.pid


def test_worker_killed_from_outside_resumes_from_checkpoint_and_registers_once(stack, ray_session, tiny_model,
                                                                               unique_name):
    from peftray.registry import list_versions
    from peftray.train import run_job

    # Reports every 2 steps each wait for the controller's poll (RAY_TRAIN_ENV: every 0.25 s) and upload a checkpoint:
    # 40 steps outlast the kill by many reports, also on a quiet machine.
    total = 40
    spec = _tiny_spec(tiny_model, unique_name, f"training.max_steps={total}", "training.checkpoint_every=2",
                      "training.eval_every=null")
    job_over = threading.Event()
    with cf.ThreadPoolExecutor(1) as pool:  # Ray Train's fit() stays in the main thread; the killer beside it
        killer = pool.submit(_kill_a_worker_after_checkpoints, stack, ray_session, spec, job_over)
        try:
            result = run_job(spec, stack)
        finally:
            job_over.set()
        killer.result(timeout=60)  # a worker was killed mid-run (or this says why not)
    client = _client(stack)
    resumed = [m.value for m in client.get_metric_history(result.run_id, "resumed_from_step")]
    # restarted once, from a registered checkpoint (step 2 or later), not from step 0
    assert len(resumed) == 1 and 2 <= resumed[0] < total and resumed[0] % 2 == 0, resumed
    assert result.metrics["step"] == float(total)
    assert [v.version for v in list_versions(spec.model_name, config=stack)] == [result.version]

    again = run_job(spec, stack)  # the same job name again: resumes from its final checkpoint, registers nothing new
    resumed_again = sorted(m.value for m in client.get_metric_history(result.run_id, "resumed_from_step"))
    assert again.run_id == result.run_id and again.version == result.version
    assert resumed_again == sorted([resumed[0], float(total)])
    assert [v.version for v in list_versions(spec.model_name, config=stack)] == [result.version]


def test_qlora_spec_trains_on_ray_and_a_refused_spec_gate_leaves_the_job_succeeded(stack, ray_session, tiny_model,
                                                                                     unique_name):
    """jobs/tiny-qlora.yaml (`quantization: 4bit`) trains on Ray Train workers, not only under `--check`; its spec
    gate cannot pass (eval_loss <= 0), so the version is registered, the alias stays unset, the refusal is reported
    and audited, and the job itself succeeds."""
    from peftray.registry import audit_log, list_versions
    from peftray.train import run_job

    spec = load_spec("jobs/tiny-qlora.yaml", [
        f"base_model.path={tiny_model}", f"name={unique_name}", f"registry.model_name={unique_name}",
        "training.max_steps=4", "training.eval_every=null", "dataset.eval_fraction=0.2", "resources.num_workers=1",
        "registry.promote={alias: production, gate: {metric: eval_loss, mode: min, threshold: 0.0}}"])
    assert spec.quantization == "4bit"
    result = run_job(spec, stack)  # returns: the job succeeds although its promotion was refused
    assert result.metrics["step"] == 4.0 and math.isfinite(result.metrics["eval_loss"])
    assert result.promoted_alias is None and "eval_loss" in (result.promotion_error or "")
    versions = list_versions(unique_name, config=stack)
    assert [(v.version, v.aliases) for v in versions] == [(result.version, [])]
    assert versions[0].method == "qlora" and versions[0].tags["hp.quantization"] == "4bit"
    assert [e["action"] for e in audit_log(unique_name, "production", stack)] == ["refused"]
    run = _client(stack).get_run(result.run_id)
    assert run.info.status == "FINISHED"


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
    resumes a checkpoint or MLflow run that is not its own; nor does it write into another user's adapter.

    The first runs train in this process (`in_process=True`, as a warm runner of the service does), the last
    through Ray Train: it resumes the checkpoint the in-process run stored, so both paths share run folders."""
    from peftray.errors import ForbiddenError
    from peftray.registry import fetch, list_versions
    from peftray.train import run_job
    from peftray.train.tracking import find_run

    spec = _tiny_spec(tiny_model, unique_name, "training.max_steps=2", "training.checkpoint_every=1",
                      "training.eval_every=null", "resources.num_workers=1")
    alice = run_job(spec, stack, owner="alice", in_process=True)
    client = _client(stack)
    # bob, same name and the very spec: alice's adapter name is not his to write (refused before training)
    with pytest.raises(ForbiddenError, match="belongs to 'alice'"):
        run_job(spec, stack, owner="bob", in_process=True)
    assert find_run(client, unique_name, owner="bob") is None
    # carol, an admin, may write it: her run is her own, trained from step 0, not resumed from alice's checkpoint
    carol = run_job(spec, stack, owner="carol", owner_is_admin=True, in_process=True)
    assert carol.run_id != alice.run_id and _resumed(client, carol.run_id) == []
    known = {v.version for v in list_versions(spec.model_name, config=stack)}
    # alice again, a changed spec under the same name: a new run trained from step 0, a new version
    changed = spec.model_copy(update={"training": spec.training.model_copy(update={"learning_rate": 3e-2})})
    again = run_job(changed, stack, owner="alice", in_process=True)
    assert again.run_id != alice.run_id and _resumed(client, again.run_id) == [] and again.version not in known
    assert client.get_run(again.run_id).data.params["training.learning_rate"] == "0.03"
    first = (fetch(f"{spec.model_name}/1", config=stack) / "adapter_model.safetensors").read_bytes()
    second = (fetch(f"{spec.model_name}/{again.version}", config=stack) / "adapter_model.safetensors").read_bytes()
    assert first != second
    # alice, the first spec once more, through Ray Train: her own run and the checkpoint her in-process run
    # stored, resumed after its last step; nothing new
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
