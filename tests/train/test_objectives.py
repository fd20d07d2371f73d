"""The objectives table and the preference loop: spec choices, precomputed reference, resume."""

from __future__ import annotations

import contextlib
import typing

import pytest
import torch

from peftray.jobspec import TrainingSpec, load_spec
from peftray.train import checkpoint
from peftray.train.local import run_local
from peftray.train.loop import LoopContext, train
from peftray.train.objectives import OBJECTIVES



def _ctx(history: list, checkpoints: dict, resume=None, logged: list | None = None) -> LoopContext:
    """A plain-process runner: step metrics into `history`, checkpoints by step, everything logged into `logged`."""
    def report(metrics, folder):
        if folder is not None:
            checkpoints[int(metrics["step"])] = folder

    def log(metrics, step):
        if logged is not None:
            logged.append(metrics)
        if "loss" in metrics:
            history.append({**metrics, "step": step})

    return LoopContext(rank=0, world_size=1, device=torch.device("cpu"), report=report, log=log,
                       resume_from=lambda: contextlib.nullcontext(resume))


def test_spec_objective_choices_are_the_tables_keys():
    choices = typing.get_args(TrainingSpec.model_fields["objective"].annotation)
    assert set(choices) == set(OBJECTIVES)
    assert TrainingSpec().objective == "sft"


def _dpo(tiny_model, *extra):
    return load_spec("jobs/tiny-dpo.yaml", [
        f"base_model.path={tiny_model}", "training.max_steps=4", "training.checkpoint_every=2",
        "training.eval_every=null", "training.batch_size=4", "training.warmup_steps=0",
        "dataset.max_rows=40", *extra])


def test_precomputed_reference_trains_exactly_like_the_disabled_adapter(tiny_model):
    live = run_local(_dpo(tiny_model, "training.reference=adapter_disabled"))
    table = run_local(_dpo(tiny_model, "training.reference=precomputed"))
    keys = ("loss", "rewards/margins", "logps/chosen")
    assert [h[k] for h in table.history for k in keys] == pytest.approx(
        [h[k] for h in live.history for k in keys], abs=1e-5)
    assert table.final["eval_rewards/accuracies"] == pytest.approx(live.final["eval_rewards/accuracies"])
    assert live.history[-1]["rewards/margins"] != 0  # the adapter moved away from the reference


def test_resume_with_a_precomputed_reference_reuses_the_stored_table(tiny_model, tmp_path):
    """4 steps straight == 2 steps, checkpoint, resumed: the reference comes from the checkpoint, not recomputed."""
    spec = _dpo(tiny_model, "training.reference=precomputed", "adapter.lora_dropout=0.1")
    straight, ckpts = [], {}
    first: list[dict] = []
    logged: list[dict] = []
    ctx = _ctx(straight, ckpts, logged=first)
    ctx.workdir = tmp_path
    train(spec, ctx)
    assert any("reference_seconds" in m for m in first)  # the first attempt computes the table
    stored = checkpoint.load_reference(ckpts[2])
    assert stored is not None and stored.shape == (40, 2)  # 32 train + 8 eval pairs

    torch.manual_seed(1234)  # another RNG state: the checkpoint restores the dropout RNG
    resumed = []
    ctx2 = _ctx(resumed, {}, resume=ckpts[2], logged=logged)
    ctx2.workdir = tmp_path
    train(spec, ctx2)
    assert not any("reference_seconds" in m for m in logged)  # no second reference pass
    assert [m["loss"] for m in resumed[:2]] == pytest.approx([m["loss"] for m in straight[2:4]], rel=1e-6)
    assert resumed[-1]["rewards/margins"] == pytest.approx(straight[-1]["rewards/margins"], rel=1e-6)


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "dora"])
def test_every_method_trains_with_dpo(tiny_model, method):
    run = run_local(_dpo(tiny_model, f"adapter={method}", "training.max_steps=2", "dataset.max_rows=20",
                         "training.learning_rate=0.05"))
    assert len(run.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in run.history)
    assert run.history[-1]["rewards/margins"] != 0  # the adapter's weights moved the policy off the reference
