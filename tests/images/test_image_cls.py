"""task image_cls: trained through the loop it learns the shipped colour classes; its adapters (LoRA, DoRA, IA3,
each with the classifier in modules_to_save) load in HF PEFT with the same logits, and HF PEFT's load in peftray.

Reference outputs come from HF PEFT (`peft`, a test-only dependency) on transformers' ViT.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from peftray import PeftModel
from peftray.jobspec import load_spec
from peftray.train.local import build_local, run_local
from peftray.train.loop import LoopContext, train_step

SPEC = "jobs/tiny-vit-lora.yaml"


def _vit(tiny_vit):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(tiny_vit).eval()


def _pixels(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _logits(model, pixels: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixels).logits


@pytest.fixture(scope="module")
def trained(tiny_vit, tmp_path_factory):
    """The shipped spec run by the loop in this process (one CPU thread; about 1 s of training), its checkpoints
    kept: (final metrics, the last checkpoint's adapter folder, the eval rows)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = load_spec(SPEC, [f"base_model.path={tiny_vit}"])
        run = run_local(spec, checkpoint_dir=tmp_path_factory.mktemp("vit-run"))
    finally:
        torch.set_num_threads(threads)
    return run, run.last_checkpoint / "adapter"


def test_learns_the_colour_classes_to_high_held_out_accuracy(trained, tiny_vit):
    from peftray.train.model import tokenizer_and_data

    run, _ = trained
    assert run.final["eval_accuracy"] >= 0.9, run.final
    assert run.final["eval_loss"] < run.history[0]["loss"] / 4
    # the frozen base alone (its random head) does not know the classes
    _, data = tokenizer_and_data(load_spec(SPEC, [f"base_model.path={tiny_vit}"]), str(tiny_vit))
    pixels = torch.stack([e["pixel_values"] for e in data.eval])
    labels = torch.tensor([e["label"] for e in data.eval])
    base_accuracy = float((_logits(_vit(tiny_vit), pixels).argmax(-1) == labels).float().mean())
    assert base_accuracy < 0.6
    adapted = PeftModel.from_pretrained(_vit(tiny_vit), str(trained[1]))
    assert float((_logits(adapted, pixels).argmax(-1) == labels).float().mean()) == run.final["eval_accuracy"]


def test_the_adapter_on_disk_is_hf_peft_lora_with_the_classifier(trained):
    folder = trained[1]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] is None
    assert config["modules_to_save"] == ["classifier"] and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    with safe_open(folder / "adapter_model.safetensors", "pt") as fh:
        keys = set(fh.keys())
        assert fh.get_tensor("base_model.model.classifier.weight").shape == (4, 64)
    assert "base_model.model.vit.layers.0.attention.q_proj.lora_A.weight" in keys
    assert "base_model.model.vit.layers.1.attention.v_proj.lora_B.weight" in keys
    assert "base_model.model.classifier.bias" in keys and len(keys) == 2 * 2 * 2 + 2


def _train_a_few_steps(tiny_vit, method: str, steps: int = 3):
    spec = load_spec(SPEC, [f"base_model.path={tiny_vit}", f"adapter={{method: {method}}}",
                            f"training.max_steps={steps}", "training.learning_rate=0.05"])
    job = build_local(spec)
    ctx = LoopContext(rank=0, world_size=1, device=torch.device("cpu"), report=lambda m, f: None,
                      resume_from=lambda: None)
    for step in range(steps):
        train_step(job, ctx, step)
    return job.model


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_peftray_adapters_load_in_hf_peft_with_the_same_logits(method, trained, tiny_vit, tmp_path):
    import peft

    if method == "lora":
        folder = trained[1]
    else:
        folder = tmp_path / method
        _train_a_few_steps(tiny_vit, method).save_pretrained(folder)
    pixels = _pixels()
    ours = _logits(PeftModel.from_pretrained(_vit(tiny_vit), str(folder)), pixels)
    theirs_model = peft.PeftModel.from_pretrained(_vit(tiny_vit), str(folder))
    theirs = _logits(theirs_model, pixels)
    assert (ours - _logits(_vit(tiny_vit), pixels)).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert any("classifier.modules_to_save" in n for n, _ in theirs_model.named_parameters())


def test_hf_peft_lora_with_the_classifier_loads_in_peftray_and_back(tiny_vit, tmp_path):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"],
                             init_lora_weights=False)
    torch.manual_seed(0)
    reference = peft.get_peft_model(_vit(tiny_vit), config)
    with torch.no_grad():  # a trained head differs from the base's: make this one differ too
        for p in reference.base_model.model.classifier.modules_to_save["default"].parameters():
            p.add_(torch.randn_like(p))
    reference.save_pretrained(tmp_path / "hf")
    pixels = _pixels()
    expected = _logits(reference, pixels)
    ours = PeftModel.from_pretrained(_vit(tiny_vit), str(tmp_path / "hf"))
    torch.testing.assert_close(_logits(ours, pixels), expected, atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "back")
    again = peft.PeftModel.from_pretrained(_vit(tiny_vit), str(tmp_path / "back"))
    torch.testing.assert_close(_logits(again, pixels), expected, atol=1e-5, rtol=1e-5)


def test_the_readme_snippet_classifies_with_the_trained_adapter(trained, tiny_vit, tmp_path, monkeypatch):
    import re
    import shutil
    from pathlib import Path

    from PIL import Image

    section = (Path(__file__).resolve().parents[2] / "README.md").read_text().split("### Image classification", 1)[1]
    snippet = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)[0]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-vit").symlink_to(tiny_vit)
    shutil.copytree(trained[1], tmp_path / "adapter")
    scope = {"image": Image.open("jobs/data/colours/yellow/triangle-3.png")}
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README image classification snippet", "exec"), scope)  # noqa: S102 - our README
    assert scope["label"] == "yellow"
