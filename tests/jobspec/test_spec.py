"""The job spec: every example in jobs/ validates; bad input fails with a message naming field, value, fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftray.errors import ConfigError
from peftray.jobspec import METHODS, JobSpec, load_spec

# jobs/ holds job specs, and serve specs named serve-*.yaml (`peftray serve deploy`; tests/serve/test_serve_specs.py)
JOBS = sorted(p for p in (Path(__file__).parents[2] / "jobs").glob("*.yaml") if not p.name.startswith("serve-"))
BASE = """
name: t1
base_model: ./tiny
adapter: {method: lora, r: 8}
dataset: {source: jobs/data/tiny_instruct.jsonl, format: instruction}
"""


def test_jobs_folder_has_every_method():
    methods = {load_spec(p).method for p in JOBS}
    assert set(METHODS) <= methods | {"dora"} and "dora" in methods


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_yaml_validates(path):
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)
    # the flattened params round-trip every leaf the user wrote
    assert spec.to_flat_params()["name"] == spec.name


def test_overrides_are_yaml_scalars():
    spec = load_spec(BASE, ["training.max_steps=5", "training.learning_rate=1e-3",
                            "adapter.target_modules=[q_proj, v_proj]", "resources.use_gpu=false"])
    assert spec.training.max_steps == 5 and spec.training.learning_rate == pytest.approx(1e-3)
    assert spec.adapter.target_modules == ["q_proj", "v_proj"]


def test_dora_is_lora_with_use_dora():
    spec = load_spec(BASE, ["adapter.method=dora"])
    kw = spec.peft_kwargs()
    assert kw["use_dora"] is True and kw["task_type"] == "CAUSAL_LM" and "method" not in kw


def test_shorthands():
    spec = load_spec(BASE.replace("adapter: {method: lora, r: 8}", "adapter: ia3"))
    assert spec.method == "ia3" and spec.base_model.path == "./tiny"


@pytest.mark.parametrize("override, needles", [
    (["adapter.r=0"], ["`adapter.r`", "greater than 0", "got 0", "adapter.r="]),
    (["adapter.method=foo"], ["`adapter.method`", '"foo"', "lora, dora, ia3, prompt_tuning"]),
    (["training.lr=1"], ["unknown field `training.lr`", "learning_rate"]),
    (["adapter.bogus=1"], ["unknown field `adapter.bogus`", "lora_alpha"]),
    (["runtime_env.pip=[evil]"], ["unknown field `runtime_env`"]),
    (["entrypoint=rm -rf /"], ["unknown field `entrypoint`"]),
    (["name=../etc"], ["`name`", "safe name", '"../etc"']),
    (["name=a/b"], ["`name`", '"a/b"']),
    (["resources.placement_strategy=X"], ["`resources.placement_strategy`", "'SPREAD'", '"X"']),
    (["training.epochs=2", "training.max_steps=3"], ["training.epochs", "training.max_steps", "choose one"]),
    (["task=seq_cls"], ["classification"]),
    (["dataset.format=xml"], ["`dataset.format`", "'chat'", '"xml"']),
    (["dataset.packing=true"], ["packing", "text"]),
    (["resources.use_gpu=true", "resources.use_tpu=true"], ["use_gpu", "use_tpu"]),
    (["resources.topology=2x2"], ["topology", "use_tpu"]),
    (["registry.promote.alias=prod", "registry.promote.gate.metric=eval_loss", "registry.promote.gate.mode=min"],
     ["threshold", "no_worse_than_current"]),
    (["quantization=2bit"], ["`quantization`", "'4bit'"]),
    (["quantization=4bit", "adapter=prompt_tuning"], ["quantization", "prompt_tuning"]),
    (["training"], ["key=value"]),
    (["adapter.r.x=1"], ["adapter.r", "not a section"]),
    (["training.learning_rate=.inf"], ["`training.learning_rate`", "finite"]),
    (["training.max_grad_norm=.nan"], ["`training.max_grad_norm`", "finite"]),
    (["adapter.lora_alpha=-.inf"], ["`adapter.lora_alpha`", "finite"]),
    (["dataset.eval_fraction=.nan"], ["`dataset.eval_fraction`", "finite"]),
    (["adapter.alpha_pattern={q_proj: .inf}"], ["`adapter.alpha_pattern.q_proj`", "finite"]),
])
def test_bad_specs_name_field_value_and_allowed(override, needles):
    with pytest.raises(ConfigError) as info:
        load_spec(BASE, override)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="`dataset` is required"):
        load_spec("name: x\nbase_model: y\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="mapping"):
        load_spec("- a\n- b\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec("a: [\n")


def test_load_from_mapping_and_flat_params():
    import yaml

    data = yaml.safe_load(BASE)
    spec = load_spec(data, ["registry.tags.team=ml"])
    assert "registry" not in data  # the caller's mapping is not mutated
    flat = spec.to_flat_params()
    assert flat["registry.tags.team"] == "ml" and flat["adapter.r"] == "8"
    assert flat["adapter.method"] == "lora" and all(isinstance(v, str) for v in flat.values())
    assert load_spec(spec.to_yaml()) == spec


def test_local_paths_are_pinned_where_they_exist_and_nothing_else_is(tmp_path, monkeypatch):
    from peftray.jobspec.load import pin_local_path

    (tmp_path / "spec_dir" / "model").mkdir(parents=True)
    (tmp_path / "data.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert pin_local_path("data.jsonl") == str(tmp_path / "data.jsonl")
    assert pin_local_path("model", (tmp_path / "spec_dir", tmp_path)) == str(tmp_path / "spec_dir" / "model")
    for untouched in ("gpt2", "org/model", "s3://bucket/model", "/abs/elsewhere", 5, None):
        assert pin_local_path(untouched) == untouched


def test_fingerprint_is_the_spec_without_its_description():
    import hashlib
    import json

    spec = load_spec(BASE)
    data = spec.model_dump(mode="json")
    del data["description"]
    # left out while unset, so the specs written before the field keep their fingerprint (and their runs)
    del data["adapter"]["text_encoder_target_modules"]
    expected = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert spec.fingerprint() == expected
    assert load_spec(BASE, ["description=other words"]).fingerprint() == expected
    assert load_spec(BASE, ["training.learning_rate=0.5"]).fingerprint() != expected
