"""dataset.format image_caption and the text_to_image spec checks: decoding, errors naming the row, mismatches."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from peftray.data import prepare_data
from peftray.errors import ConfigError
from peftray.jobspec import load_spec
from peftray.train.model import tokenizer_and_data

SPEC = "jobs/tiny-sd-lora.yaml"


def _spec(tiny_sd, *overrides):
    return load_spec(SPEC, [f"base_model.path={tiny_sd}", *overrides])


def test_shipped_shapes_decode_to_vae_input(tiny_sd):
    tok, data = tokenizer_and_data(_spec(tiny_sd), str(tiny_sd))
    assert len(data.train) == 48 and len(data.eval) == 16
    example = data.train[0]
    assert example["pixel_values"].shape == (3, 32, 32) and example["pixel_values"].dtype == torch.float32
    assert -1.0 <= float(example["pixel_values"].min()) < 0 < float(example["pixel_values"].max()) <= 1.0
    assert len(example["input_ids"]) == tok.model_max_length
    assert tok.decode(example["input_ids"], skip_special_tokens=True).strip() == example["caption"]


def _rows(tmp_path, rows):
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_images_are_refused_naming_the_row(tiny_sd, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    cases = [({"image": "broken.png", "caption": "a red circle"}, "row 2: image file .*broken.png is not an image"),
             ({"image": "missing.png", "caption": "a red circle"}, "row 2: image file missing.png does not exist"),
             ({"image": "data:image/png;base64,@@@", "caption": "a red circle"}, "row 2: .*data: URI"),
             ({"image": 7, "caption": "a red circle"}, "row 2: `image` must be an image path")]
    png = base64.b64encode(open("jobs/data/shapes/images/red-circle-0.png", "rb").read()).decode()
    first = {"image": f"data:image/png;base64,{png}", "caption": "a red circle"}
    for bad, message in cases:
        source = _rows(tmp_path, [first, bad])
        spec = _spec(tiny_sd, f"dataset.source={source}", "dataset.eval_fraction=0")
        with pytest.raises(ConfigError, match=message):
            tokenizer_and_data(spec, str(tiny_sd))
    source = _rows(tmp_path, [first, {"image": first["image"], "caption": " "}])
    with pytest.raises(ConfigError, match="row 2: `caption` must be a non-empty caption"):
        tokenizer_and_data(_spec(tiny_sd, f"dataset.source={source}", "dataset.eval_fraction=0"), str(tiny_sd))
    with pytest.raises(ConfigError, match="`dataset.image_field` is 'picture'"):
        tokenizer_and_data(_spec(tiny_sd, "dataset.image_field=picture"), str(tiny_sd))


def test_task_and_base_mismatches_are_refused(tiny_sd, tiny_model):
    with pytest.raises(ConfigError, match="task: text_to_image` needs `base_model.path` to be a diffusers"):
        tokenizer_and_data(_spec(tiny_model), str(tiny_model))
    spec = load_spec("jobs/tiny-lora-instruct.yaml", [f"base_model.path={tiny_sd}"])
    with pytest.raises(ConfigError, match="is a diffusers pipeline, but `task: causal_lm`"):
        tokenizer_and_data(spec, str(tiny_sd))
    with pytest.raises(ConfigError, match="task text_to_image needs dataset.format 'image_caption'"):
        load_spec(SPEC, ["dataset.format=text"])
    with pytest.raises(ConfigError, match="`training.snr_gamma` applies to task text_to_image"):
        load_spec("jobs/tiny-lora-instruct.yaml", ["training.snr_gamma=5"])
    with pytest.raises(ConfigError, match="needs the model's image size"):
        prepare_data(_spec(tiny_sd), None)
