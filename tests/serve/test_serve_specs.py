"""Every serve spec shipped in jobs/ (serve-*.yaml) is a valid `peftray serve deploy` spec of its task."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftray.errors import ConfigError
from peftray.serve.serve_spec import load_serve_config
from peftray.tuners.tasks import TASKS

SPECS = sorted((Path(__file__).parents[2] / "jobs").glob("serve-*.yaml"))


def test_the_shipped_serve_specs_are_found():
    assert {p.name for p in SPECS} >= {"serve-demo.yaml", "serve-tiny.yaml", "serve-tiny-sd.yaml", "serve-minilm.yaml",
                                       "serve-tiny-vit.yaml"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_serve_spec_validates(path):
    spec = load_serve_config(path)
    assert spec.name and spec.task in TASKS
    assert spec.base_model and spec.served_model_id
    if spec.task == "text_to_image":
        assert spec.image_sizes  # the sizes a request may ask for
    if spec.labels is not None:
        assert spec.task in ("seq_cls", "image_cls")  # the classes of a base whose config names none


def test_a_job_spec_is_not_a_serve_spec():
    with pytest.raises(ConfigError):
        load_serve_config(Path(__file__).parents[2] / "jobs" / "tiny-lora-instruct.yaml")
