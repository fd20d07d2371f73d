"""The tiny ViT folder: transformers loads the model and its image processor; made once, offline."""

from __future__ import annotations

import json
import time

import pytest
import torch

from peftray.data.shapes import colour_classes
from peftray.tiny_vit import TinyViTSpec, make_tiny_vit


def test_transformers_loads_the_classifier_and_its_image_processor(tiny_vit):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(tiny_vit).eval()
    assert model.config.id2label == dict(enumerate(colour_classes()))
    assert type(AutoModelForImageClassification.from_pretrained(tiny_vit)) is ViTForImageClassification
    processor = AutoImageProcessor.from_pretrained(tiny_vit)
    pixels = processor(images=[Image.new("RGB", (50, 40), (255, 255, 255))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels, torch.ones_like(pixels))  # white scaled to [-1, 1] (mean 0.5, std 0.5)
    with torch.no_grad():
        assert model(pixel_values=pixels).logits.shape == (1, len(colour_classes()))


def test_a_training_step_is_well_under_a_second(tiny_vit):
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(tiny_vit)
    pixels, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: more threads than free cores only adds waiting
    try:
        times = []
        for _ in range(4):  # the first one warms up; the best of the rest is the step's cost
            began = time.perf_counter()
            model(pixel_values=pixels, labels=labels).loss.backward()  # every weight trains: dearer than LoRA
            times.append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    assert min(times[1:]) < 0.25, times


def test_made_once_and_refuses_foreign_folder(tiny_vit, tmp_path):
    assert make_tiny_vit(tiny_vit, colour_classes()) == tiny_vit  # reused: same stamp
    stamp = json.loads((tiny_vit / "peftray_model.json").read_text())
    assert stamp["labels"] == colour_classes() and stamp["patch_size"] == TinyViTSpec().patch_size
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a tiny ViT"):
        make_tiny_vit(tmp_path / "other", ["a", "b"])
    with pytest.raises(ValueError, match="two distinct class names"):
        make_tiny_vit(tmp_path / "one", ["a", "a"])


def test_cli_writes_the_labels_given(tmp_path):
    from transformers import AutoConfig

    from peftray.cli import main

    assert main(["make-tiny-model", "--kind", "vit", "--labels", "cat,dog,bird", str(tmp_path / "vit")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "vit").id2label == {0: "cat", 1: "dog", 2: "bird"}
    assert (tmp_path / "vit" / "preprocessor_config.json").is_file()
