"""serve.yaml validation (pure, no server) and the example serve specs in jobs/."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftray.errors import ConfigError
from peftray.serve import ServeConfig, load_serve_config

JOBS = Path(__file__).parents[2] / "jobs"


@pytest.mark.parametrize("path", sorted(JOBS.glob("serve-*.yaml")), ids=lambda p: p.name)
def test_example_serve_specs_validate(path):
    spec = load_serve_config(path, {"base_model": "/models/x"})
    assert spec.max_adapters_per_replica >= 1 and spec.adapters


def test_relative_base_model_is_resolved_next_to_the_spec(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "s.yaml").write_text("base_model: models/m\n")
    assert load_serve_config(tmp_path / "s.yaml").base_model == str((tmp_path / "models" / "m").resolve())
    (tmp_path / "h.yaml").write_text("base_model: meta-llama/Llama-3.2-1B\n")
    assert load_serve_config(tmp_path / "h.yaml").base_model == "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize("bad, field", [
    ({"max_adapters_per_replica": 0}, "max_adapters_per_replica"),
    ({"max_batch_size": -1}, "max_batch_size"),
    ({"adapters": []}, "adapters"),
    ({"max_adapter": 3}, "max_adapter"),
    ({"device": "tpu9"}, "device"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 1}}, "autoscaling"),
])
def test_bad_fields_are_named(bad, field):
    with pytest.raises(ConfigError, match=field):
        load_serve_config({"base_model": "/m", **bad})


def test_defaults_never_bind_port_8000():
    spec = ServeConfig(base_model="/m")
    assert spec.http_port is None and spec.served_model_id == "/m"
