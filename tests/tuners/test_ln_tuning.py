"""LayerNorm tuning against HF PEFT's LNTuningModel: the same logits both ways, training touches only the norm
copies, and disable/merge/unmerge/unload behave as HF PEFT's (merging swaps the copy in, it folds nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftray
from tuner_helpers import llama_inputs, logits

ROOT = Path(__file__).resolve().parents[2]


def _changed(model, scale: float = 0.3) -> None:
    """Move every trainable tensor (the norm copies) away from the base, so the adapter changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def test_same_logits_as_peft_both_ways(llama, tmp_path):
    inputs = llama_inputs()
    torch.manual_seed(0)
    ours = peftray.get_peft_model(llama(), peftray.LNTuningConfig(task_type="CAUSAL_LM"))
    _changed(ours)
    ours.save_pretrained(tmp_path / "ours")
    ref_loaded = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours")
    assert (logits(ref_loaded, inputs) - logits(ours, inputs)).abs().max() <= 1e-6
    assert (logits(ours, inputs) - logits(llama(), inputs)).abs().max() > 1e-3

    ref = peft.get_peft_model(llama(), peft.LNTuningConfig(task_type="CAUSAL_LM"))
    _changed(ref)
    ref.save_pretrained(tmp_path / "ref")
    ours_loaded = peftray.PeftModel.from_pretrained(llama(), tmp_path / "ref")
    assert (logits(ours_loaded, inputs) - logits(ref, inputs)).abs().max() <= 1e-6
    # HF PEFT's key names: <norm path>.ln_tuning_layers.weight, one per norm the Llama default targets
    keys = sorted(load_file(tmp_path / "ref" / "adapter_model.safetensors"))
    assert keys == sorted(ours_loaded.get_adapter_state_dict()) and len(keys) == 5
    assert "base_model.model.model.norm.ln_tuning_layers.weight" in keys


def test_training_changes_only_the_norm_copies_as_peft_does(llama):
    inputs = llama_inputs()
    ours = peftray.get_peft_model(llama(), peftray.LNTuningConfig(task_type="CAUSAL_LM"))
    ref = peft.get_peft_model(llama(), peft.LNTuningConfig(task_type="CAUSAL_LM"))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for model in (ours, ref):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
            opt.step()
            opt.zero_grad()
    changed = {k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".ln_tuning_layers.default." in k for k in changed)
    assert len(changed) == 5
    ours_sd, ref_sd = ours.get_adapter_state_dict(), peft.get_peft_model_state_dict(ref)
    assert ours_sd.keys() == ref_sd.keys()
    assert all((ours_sd[k] - ref_sd[k]).abs().max() < 1e-5 for k in ref_sd)


def test_disable_merge_unmerge_and_unload_behave_as_peft(llama, tmp_path):
    inputs = llama_inputs()
    torch.manual_seed(0)
    ours = peftray.get_peft_model(llama(), peftray.LNTuningConfig(task_type="CAUSAL_LM"))
    _changed(ours)
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(llama(), tmp_path)
    base, adapted = logits(llama(), inputs), logits(ref, inputs)

    def same(expected):
        assert (logits(ours, inputs) - expected).abs().max() <= 1e-6
        assert (logits(ref, inputs) - expected).abs().max() <= 1e-6

    for model in (ours, ref):
        model.merge_adapter()
    same(adapted)
    # merging swaps the trained copy in: the adapter's slot then holds the original, in both
    assert (ours.get_adapter_state_dict()["base_model.model.model.norm.ln_tuning_layers.weight"]
            == 1).all()  # the tiny Llama's norms are ones
    for model in (ours, ref):
        with model.disable_adapter():  # disabling unmerges (as HF PEFT's layer does) and runs the base
            assert (logits(model, inputs) - base).abs().max() <= 1e-6
    assert ours.base_model.model.model.norm.merged is False
    same(adapted)
    for model in (ours, ref):
        model.merge_adapter()
        model.unmerge_adapter()
    same(adapted)
    assert (logits(ours.merge_and_unload(), inputs) - adapted).abs().max() <= 1e-6
    assert (logits(ref.unload(), inputs) - base).abs().max() <= 1e-6


def test_one_adapter_at_a_time(llama):
    ours = peftray.get_peft_model(llama(), peftray.LNTuningConfig(task_type="CAUSAL_LM"))
    ours.add_adapter("other", peftray.LNTuningConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="one adapter at a time"):
        ours.merge_adapter(["default", "other"])


def test_bf16_base_keeps_bf16_copies_like_peft(tiny_model):
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)

    ours = peftray.get_peft_model(load(), peftray.LNTuningConfig(task_type="CAUSAL_LM"))
    ref = peft.get_peft_model(load(), peft.LNTuningConfig(task_type="CAUSAL_LM"))
    assert {n: p.dtype for n, p in ours.named_parameters() if p.requires_grad} == \
        {n: p.dtype for n, p in ref.named_parameters() if p.requires_grad}
    assert logits(ours, llama_inputs()).isfinite().all()


def test_example_job_spec_validates_and_trains_in_process(tiny_model):
    from peftray.jobspec import load_spec
    from peftray.train.local import run_local

    spec = load_spec(ROOT / "jobs" / "tiny-ln-tuning.yaml",
                     [f"base_model.path={tiny_model}", "training.epochs=null", "training.max_steps=3"])
    assert spec.adapter.method == "ln_tuning" and spec.peft_kwargs()["task_type"] == "CAUSAL_LM"
    run = run_local(spec)
    assert [m["step"] for m in run.history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in run.history)
    proc = subprocess.run([sys.executable, "-m", "peftray", "train", "jobs/tiny-ln-tuning.yaml", "--check"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "method: ln_tuning" in proc.stdout, proc.stderr
