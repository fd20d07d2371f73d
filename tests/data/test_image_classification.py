"""dataset.format image_classification: class folders, files with image + label columns, the base's image
processor, and bad input refused before training naming the row and the file."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
import torch

from peftray.data.shapes import colour_classes
from peftray.errors import ConfigError
from peftray.jobspec import load_spec
from peftray.train.model import tokenizer_and_data

SPEC = "jobs/tiny-vit-lora.yaml"
SHIPPED = "jobs/data/colours"


def _spec(tiny_vit, *overrides):
    return load_spec(SPEC, [f"base_model.path={tiny_vit}", *overrides])


def _data(tiny_vit, *overrides):
    return tokenizer_and_data(_spec(tiny_vit, *overrides), str(tiny_vit))


def _png(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def test_shipped_class_folders_become_processor_pixels_and_sorted_label_ids(tiny_vit):
    from PIL import Image

    processor, data = _data(tiny_vit)
    assert data.label_names == colour_classes() == ["blue", "green", "red", "yellow"]
    assert len(data.train) == 72 and len(data.eval) == 24  # 96 images, eval_fraction 0.25
    assert sorted({e["label"] for e in data.eval}) == [0, 1, 2, 3]
    example = data.train[0]
    assert example["pixel_values"].shape == (3, 32, 32) and example["pixel_values"].dtype == torch.float32
    # exactly what the model's image processor makes of the file (resize + normalize follow its config)
    expected = processor(images=[Image.open(f"{SHIPPED}/blue/circle-0.png").convert("RGB")],
                         return_tensors="pt")["pixel_values"][0]
    blue_circle = [e for e in data.train + data.eval if torch.equal(e["pixel_values"], expected)]
    assert blue_circle and blue_circle[0]["label"] == 0
    assert data.fingerprint.startswith("sha256:")
    assert _data(tiny_vit)[1].fingerprint == data.fingerprint  # the same bytes, the same fingerprint


def test_class_folder_fingerprint_follows_the_content(tiny_vit, tmp_path):
    shutil.copytree(SHIPPED, tmp_path / "c")
    (tmp_path / "c" / "README.md").write_text("not an image: skipped")
    before = _data(tiny_vit, f"dataset.source={tmp_path / 'c'}")[1].fingerprint
    assert before == _data(tiny_vit)[1].fingerprint  # non-image files do not count
    (tmp_path / "c" / "red" / "circle-0.png").write_bytes(_png(f"{SHIPPED}/red/square-0.png"))
    assert _data(tiny_vit, f"dataset.source={tmp_path / 'c'}")[1].fingerprint != before


def _csv_rows(tmp_path, n_per_class: int = 3) -> list[dict]:
    rows = []
    for colour in colour_classes():
        for k in range(n_per_class):
            rows.append({"path": f"imgs/{colour}-{k}.png", "colour": colour})
            (tmp_path / "imgs").mkdir(exist_ok=True)
            shutil.copy(f"{SHIPPED}/{colour}/circle-{k}.png", tmp_path / "imgs" / f"{colour}-{k}.png")
    return rows


def test_csv_with_relative_paths_and_configurable_columns(tiny_vit, tmp_path):
    import pandas as pd

    rows = _csv_rows(tmp_path)
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    _, data = _data(tiny_vit, f"dataset.source={tmp_path / 'train.csv'}", "dataset.image_field=path",
                    "dataset.label_field=colour", "dataset.labels=[yellow, red, green, blue]", "dataset.eval_fraction=0")
    assert data.label_names == ["yellow", "red", "green", "blue"] and len(data.train) == 12
    assert [e["label"] for e in data.train] == [3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]


def test_jsonl_with_data_uris_and_parquet_with_bytes(tiny_vit, tmp_path):
    import pandas as pd

    rows = [{"image": "data:image/png;base64," + base64.b64encode(_png(f"{SHIPPED}/{c}/cross-1.png")).decode(),
             "label": c} for c in colour_classes()]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, from_jsonl = _data(tiny_vit, f"dataset.source={tmp_path / 'rows.jsonl'}", "dataset.eval_fraction=0")
    raw = [{"image": _png(f"{SHIPPED}/{c}/cross-1.png"), "label": i} for i, c in enumerate(colour_classes())]
    pd.DataFrame(raw).to_parquet(tmp_path / "rows.parquet")
    _, from_parquet = _data(tiny_vit, f"dataset.source={tmp_path / 'rows.parquet'}", "dataset.eval_fraction=0")
    assert [e["label"] for e in from_jsonl.train] == [e["label"] for e in from_parquet.train] == [0, 1, 2, 3]
    for a, b in zip(from_jsonl.train, from_parquet.train):
        assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_bad_images_and_labels_are_refused_naming_the_row(tiny_vit, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    good = {"image": "data:image/png;base64," + base64.b64encode(_png(f"{SHIPPED}/red/circle-0.png")).decode(),
            "label": "red"}
    cases = [({"image": "broken.png", "label": "red"}, r"row 2: image file .*broken.png is not an image Pillow"),
             ({"image": "missing.png", "label": "red"}, "row 2: image file missing.png does not exist"),
             ({"image": "data:image/png;base64,@@@", "label": "red"}, "row 2: .*data: URI without valid base64"),
             ({"image": None, "label": "red"}, "row 2: `image` must be an image path, s3:// URI, data: URI or bytes"),
             ({"image": good["image"], "label": "purple"}, r"row 2: label 'purple' is not one of `dataset.labels`")]
    for bad, message in cases:
        (tmp_path / "rows.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ConfigError, match=message):
            _data(tiny_vit, f"dataset.source={tmp_path / 'rows.jsonl'}", "dataset.eval_fraction=0",
                  "dataset.labels=[red, blue]")
    with pytest.raises(ConfigError, match="`dataset.label_field` is 'class'.*columns are image, label"):
        _data(tiny_vit, f"dataset.source={tmp_path / 'rows.jsonl'}", "dataset.label_field=class")


def test_bad_class_folders_are_refused_naming_the_file(tiny_vit, tmp_path):
    shutil.copytree(SHIPPED, tmp_path / "c")
    (tmp_path / "c" / "green" / "oops.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ConfigError, match=r"image file .*c/green/oops.png is not an image Pillow can decode"):
        _data(tiny_vit, f"dataset.source={tmp_path / 'c'}")
    (tmp_path / "c" / "green" / "oops.png").unlink()
    shutil.copy(f"{SHIPPED}/red/circle-0.png", tmp_path / "c" / "stray.png")
    with pytest.raises(ConfigError, match="the image stray.png is not inside a class folder"):
        _data(tiny_vit, f"dataset.source={tmp_path / 'c'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        _data(tiny_vit, f"dataset.source={tmp_path / 'empty'}")


def test_images_other_than_rgb_and_size_are_converted(tiny_vit, tmp_path):
    from PIL import Image

    for colour, mode in (("red", "L"), ("blue", "RGBA")):
        (tmp_path / "c" / colour).mkdir(parents=True)
        buf = io.BytesIO()
        Image.new(mode, (64, 48)).save(buf, format="PNG")
        (tmp_path / "c" / colour / "x.png").write_bytes(buf.getvalue())
    _, data = _data(tiny_vit, f"dataset.source={tmp_path / 'c'}", "dataset.eval_fraction=0")
    assert [tuple(e["pixel_values"].shape) for e in data.train] == [(3, 32, 32)] * 2
