"""`peftray bench images` runs end to end on the tiny pipeline (behaviour, not speed: the numbers are not judged)."""

from __future__ import annotations

import json

import pytest

from peftray.bench import images
from peftray.cli import bench as bench_cli


def test_bench_images_runs_both_sections_and_both_arms_agree(tmp_path, capsys):
    out = tmp_path / "images.json"
    assert images.main(["--quick", "--repeats", "1", "--image-size", "32", "--steps", "2", "--rank", "4",
                        "--adapters", "2", "--batch", "2", "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["train"]["loss_max_abs_diff"] < 1e-4 and r["train"]["ratio"]["n"] == 1
    assert r["train"]["ceiling"]["n"] == 1 and r["train"]["no_adapter"]["ms"] > 0
    g = r["generate"]
    assert g["image_max_abs_diff"] < 1e-3 and g["requests"] == 2
    assert g["ceiling"]["n"] == 1 and g["unet_batched"]["ms"] > 0
    assert g["unet_rows_per_step"] == [4, 4]  # 2 requests x 2 guided rows, one UNet call per step
    printed = capsys.readouterr().out
    assert "speed-up (median)" in printed and "diffusers set_adapters" in printed and "ceiling" in printed
    assert "images" in bench_cli.available()


def test_bench_images_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        images.parse_args(["--sections", "train,paint"])
    assert "paint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        images.parse_args(["--image-size", "30"])
    assert images.parse_args(["--quick"]).repeats == 2 and images.parse_args([]).repeats == 10
