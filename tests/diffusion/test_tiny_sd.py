"""The tiny Stable Diffusion pipeline folder: diffusers loads it, its tokenizer knows the caption words."""

from __future__ import annotations

import json

import pytest
import torch

from peftray.tiny_sd import EOS, TinySDSpec, make_tiny_sd


def test_pipeline_loads_and_generates(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    ids = pipe.tokenizer("a red circle").input_ids
    assert [pipe.tokenizer.convert_ids_to_tokens(i) for i in ids[1:-1]] == ["a</w>", "red</w>", "circle</w>"]
    assert ids[-1] == pipe.tokenizer.convert_tokens_to_ids(EOS)
    images = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    again = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert (images == again).all()


def test_made_once_and_refuses_foreign_folder(tiny_sd, tmp_path):
    assert make_tiny_sd(tiny_sd) == tiny_sd  # reused: same stamp
    assert json.loads((tiny_sd / "peftray_model.json").read_text())["prediction_type"] == "epsilon"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a tiny SD pipeline"):
        make_tiny_sd(tmp_path / "other")
    with pytest.raises(ValueError, match="prediction_type"):
        make_tiny_sd(tmp_path / "v", TinySDSpec(prediction_type="sample"))


def test_cli_writes_v_prediction(tmp_path):
    from peftray.cli import main

    assert main(["make-tiny-model", "--kind", "sd", "--prediction-type", "v_prediction", str(tmp_path / "sd")]) == 0
    config = json.loads((tmp_path / "sd" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
