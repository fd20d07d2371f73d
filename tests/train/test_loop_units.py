"""Pieces of the loop that need no cluster: schedule, scaling, cluster checks, checkpoint resume."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys

import pytest
import torch

from peftray.errors import ConfigError
from peftray.jobspec import ResourcesSpec, load_spec
from peftray.train import check_cluster, scaling_config
from peftray.train.loop import LoopContext, train
from peftray.jobspec.schema import TrainingSpec
from peftray.train.schedule import lr_factor, make_optimizer


def test_lr_schedule_against_closed_form():
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2, "linear") == pytest.approx(1.0) and lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_optimizer_groups_and_fused_adamw_on_cpu():
    """Only trainable tensors, no weight decay on 1-d ones, and the fused AdamW kernel (one call per step) with the
    same update as the per-tensor loop."""
    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
        m[1].weight.requires_grad_(False)
        return m

    spec = TrainingSpec(learning_rate=0.01, weight_decay=0.1)
    fast, loop = model(), model()
    opt = make_optimizer(fast, spec)
    assert opt.defaults["fused"] is True
    decay, no_decay = opt.param_groups
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 8)] and decay["weight_decay"] == 0.1
    assert [tuple(p.shape) for p in no_decay["params"]] == [(4,), (2,)] and no_decay["weight_decay"] == 0.0
    reference = torch.optim.AdamW([{"params": [loop[0].weight], "weight_decay": 0.1},
                                   {"params": [loop[0].bias, loop[1].bias], "weight_decay": 0.0}], lr=0.01)
    x = torch.randn(5, 8)
    for m, o in ((fast, opt), (loop, reference)):
        for _ in range(3):
            m(x).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(fast.parameters(), loop.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_scaling_config_cpu_gpu_tpu():
    cpu = scaling_config(ResourcesSpec(num_workers=2, cpus_per_worker=2, placement_strategy="SPREAD"))
    assert cpu.num_workers == 2 and not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 2}
    assert cpu.placement_strategy == "SPREAD"
    gpu = scaling_config(ResourcesSpec(num_workers=4, use_gpu=True, gpus_per_worker=0.5, accelerator_type="A100"))
    assert gpu.use_gpu and gpu.resources_per_worker["GPU"] == 0.5 and gpu.accelerator_type == "A100"
    # one worker per TPU host, holding all its chips: a v6e 2x2x1 slice is 1 host x 4 chips
    tpu = scaling_config(ResourcesSpec(num_workers=1, use_tpu=True, topology="2x2x1", accelerator_type="TPU-V6E"))
    assert tpu.use_tpu and tpu.topology == "2x2x1" and tpu.resources_per_worker["TPU"] == 4
    with pytest.raises(ConfigError, match=r"slice has 1 host\(s\) of 4 chips.*num_workers=1"):
        scaling_config(ResourcesSpec(num_workers=3, use_tpu=True, topology="2x2x1", accelerator_type="TPU-V6E"))


def test_use_gpu_without_gpus_is_a_config_error():
    with pytest.raises(ConfigError, match=r"`resources.use_gpu` is true.*no GPUs.*CPU=8"):
        check_cluster(ResourcesSpec(use_gpu=True), {"CPU": 8.0, "memory": 1e9})
    with pytest.raises(ConfigError, match="no TPUs"):
        check_cluster(ResourcesSpec(use_tpu=True, topology="2x2x1"), {"CPU": 8.0})
    check_cluster(ResourcesSpec(use_gpu=True), {"CPU": 8.0, "GPU": 1.0})


def _ctx(history, checkpoints, resume=None, reports=None):
    """history: the metrics logged per step (MLflow's side); reports: what went to the runner (Ray's side)."""
    def report(metrics, folder):
        if reports is not None:
            reports.append((int(metrics["step"]), folder is not None))
        if folder is not None:
            checkpoints[int(metrics["step"])] = folder

    def log(metrics, step):
        if "loss" in metrics:
            history.append({**metrics, "step": step})
        elif history and "eval_loss" in metrics:
            history[-1] = {**history[-1], **metrics}

    return LoopContext(rank=0, world_size=1, device=torch.device("cpu"), report=report, log=log,
                       resume_from=lambda: contextlib.nullcontext(resume))


def test_resume_from_checkpoint_continues_the_same_curve(tiny_model, tmp_path, capsys):
    """4 steps straight == 2 steps, checkpoint, a fresh process state resumed from it, 2 more steps."""
    spec = load_spec("jobs/tiny-lora-instruct.yaml", [
        f"base_model.path={tiny_model}", "training.max_steps=4", "training.checkpoint_every=2",
        "training.eval_every=null", "resources.num_workers=1", "adapter.lora_dropout=0.1"])
    straight, ckpts, reports = [], {}, []
    ctx = _ctx(straight, ckpts, reports=reports)
    ctx.workdir = tmp_path
    train(spec, ctx)
    progress = [json.loads(line.split("PEFTRAY_PROGRESS ", 1)[1]) for line in capsys.readouterr().out.splitlines()
                if "PEFTRAY_PROGRESS " in line]
    assert [p["step"] for p in progress] == [1, 2, 3, 4] and progress[0]["total_steps"] == 4
    assert progress[0]["job"] == spec.name and progress[0]["loss"] == pytest.approx(straight[0]["loss"], abs=1e-5)
    assert {"lr", "tokens_per_s"} <= set(progress[0])
    # The runner (Ray Train) hears of the checkpoint step and the end only: each report can wait for its poll.
    assert reports == [(2, True), (4, True)] and [m["step"] for m in straight] == [1, 2, 3, 4]
    torch.manual_seed(1234)  # a different RNG state: the checkpoint must restore the dropout RNG itself
    resumed = []
    ctx2 = _ctx(resumed, {}, resume=ckpts[2])
    ctx2.workdir = tmp_path
    train(spec, ctx2)
    assert [m["loss"] for m in resumed[:2]] == pytest.approx([m["loss"] for m in straight[2:4]], rel=1e-6)
    assert resumed[-1]["eval_loss"] == pytest.approx(straight[-1]["eval_loss"], rel=1e-6)


def test_entrypoint_and_cli_refuse_a_bad_spec_before_starting_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase_model: y\ndataset: {source: d.jsonl, format: text}\ntraining: {lr: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "peftray.train", "--spec", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown field `training.lr`" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "peftray", "train", "jobs/tiny-qlora.yaml", "training.max_steps=3",
                           "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "max_steps: 3" in proc.stdout


def test_newest_complete_stored_checkpoint_wins(tmp_path):
    """At restart the newest checkpoint folder whose every file was uploaded is used; a half-uploaded one is not."""
    import pyarrow.fs as pafs

    from peftray.train import checkpoint
    from peftray.train.worker import newest_stored_checkpoint

    root = tmp_path / "train" / "job"
    for step, files in ((5, checkpoint.FILES), (10, checkpoint.FILES), (15, checkpoint.FILES[:-1])):
        for name in files:
            path = root / checkpoint.folder_name(step) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    (root / "checkpoint_manager_snapshot.json").write_text("{}")
    fs = pafs.LocalFileSystem()
    assert checkpoint.step_of(newest_stored_checkpoint(str(root), fs).path) == 10
    assert newest_stored_checkpoint(str(tmp_path / "no-such-run"), fs) is None


def test_submit_cli_refuses_a_non_finite_float_without_a_traceback():
    # refused while loading the spec, before any service is contacted (none runs here)
    proc = subprocess.run([sys.executable, "-m", "peftray", "submit", "jobs/tiny-lora-instruct.yaml",
                           "training.learning_rate=.inf", "--no-wait"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "`training.learning_rate`" in proc.stderr and "finite" in proc.stderr, proc.stderr


def test_non_finite_loss_stops_the_loop_naming_the_step(tiny_model, tmp_path):
    """A learning rate of 1e38 is finite (the spec accepts it) but blows the weights up: step 2's loss is NaN."""
    from peftray.errors import NonFiniteError
    from peftray.train.local import run_local

    spec = load_spec("jobs/tiny-lora-instruct.yaml", [
        f"base_model.path={tiny_model}", "training.max_steps=4", "training.learning_rate=1e38", "training.warmup_steps=0",
        "training.lr_scheduler=constant", "training.max_grad_norm=null", "training.eval_every=null",
        "training.checkpoint_every=1"])
    with pytest.raises(NonFiniteError, match="non-finite loss at step 2"):
        run_local(spec, checkpoint_dir=tmp_path)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["peftray-ckpt-tiny-lora-instruct-%d-1" % __import__("os").getpid()]  # none after the NaN


def test_bf16_precision_on_a_float32_base_trains_like_fp32(tiny_model):
    """`base_model.dtype: float32` + `training.precision: bf16` (autocast bf16 over fp32 weights) runs the fused
    LoRA path in bf16; its loss curve follows the fp32 run's within bf16 rounding."""
    from peftray.train.local import run_local

    curves = {}
    for precision in ("fp32", "bf16"):
        spec = load_spec("jobs/tiny-lora-instruct.yaml", [
            f"base_model.path={tiny_model}", "base_model.dtype=float32", f"training.precision={precision}",
            "training.max_steps=3", "training.eval_every=null", "resources.num_workers=1"])
        curves[precision] = [m["loss"] for m in run_local(spec).history]
    assert len(curves["bf16"]) == 3
    assert curves["bf16"] == pytest.approx(curves["fp32"], rel=3e-2)
