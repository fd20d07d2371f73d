"""Checks that need no server: adapter-folder validation (pickles refused unread) and metric gates."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest

from peftray.errors import AdapterFormatError, ConfigError, GateError
from peftray.registry.gates import check_base, check_gate
from peftray.registry.resolve import parse_ref
from peftray.registry.types import AdapterVersion, MetricGate
from peftray.registry.validate import validate_adapter_dir


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_valid_folder_records_sha256_of_every_file_and_reads_the_config(lora_dir):
    d = lora_dir(rank=8, use_dora=True)
    (d / "README.md").write_text("card")
    info = validate_adapter_dir(d)
    assert set(info.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    for rel, sha in info.files.items():
        assert sha == hashlib.sha256((d / rel).read_bytes()).hexdigest()
    assert (info.method, info.rank, info.target_modules) == ("dora", 8, ["q_proj", "v_proj"])


def test_pickle_only_adapter_is_refused_without_unpickling(tmp_path):
    d = tmp_path / "pk"
    d.mkdir()
    marker = tmp_path / "unpickled"
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(AdapterFormatError, match="only pickle weights.*adapter_model.bin.*safetensors"):
        validate_adapter_dir(d)
    assert not marker.exists()
    # A pickle renamed to .safetensors is refused by the header check, still without unpickling.
    (d / "adapter_model.bin").rename(d / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="not a readable safetensors"):
        validate_adapter_dir(d)
    assert not marker.exists()


def test_folder_without_adapter_config_names_the_nested_one(lora_dir, tmp_path):
    outer = tmp_path / "outer"
    lora_dir("outer/my_adapter")
    with pytest.raises(AdapterFormatError, match="no adapter_config.json.*subfolder.*my_adapter"):
        validate_adapter_dir(outer)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LOHA"}'), "peft_type.*LOHA"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:-10]),
     "truncated"),
    (lambda d: (d / "optimizer.pt").write_bytes(b"x"), "pickle file.*optimizer.pt"),
])
def test_bad_folders_are_refused_with_the_reason(lora_dir, mutate, message):
    d = lora_dir()
    mutate(d)
    with pytest.raises(AdapterFormatError, match=message):
        validate_adapter_dir(d)


def _av(version, metrics, base="tiny-llama"):
    return AdapterVersion(name="m", version=version, source="", run_id=None, base_model=base, base_revision=None,
                          method="lora", rank=4, target_modules=[], metrics=metrics, tags={}, aliases=[], files={})


def test_threshold_gate_says_which_metric_failed_and_by_how_much():
    loss = MetricGate("eval_loss", mode="min", threshold=0.5)
    assert "eval_loss=0.45 <= 0.5" in check_gate(loss, _av(2, {"eval_loss": 0.45}), "prod", None)
    with pytest.raises(GateError, match=r"'eval_loss' = 0.62 must be <= 0.5 .*by 0.12"):
        check_gate(loss, _av(2, {"eval_loss": 0.62}), "prod", None)
    acc = MetricGate("acc", mode="max", threshold=0.9)
    with pytest.raises(GateError, match=r"'acc' = 0.85 must be >= 0.9 .*by 0.05"):
        check_gate(acc, _av(2, {"acc": 0.85}), "prod", None)
    with pytest.raises(GateError, match="has no metric 'acc'.*eval_loss"):
        check_gate(acc, _av(2, {"eval_loss": 0.1}), "prod", None)


def test_no_worse_gate_compares_with_the_current_holder():
    gate = MetricGate("eval_loss", mode="min", no_worse_than_current=True)
    holder = _av(1, {"eval_loss": 0.40})
    check_gate(gate, _av(2, {"eval_loss": 0.40}), "prod", holder)  # equal is not worse
    with pytest.raises(GateError, match=r"worse than the current holder m/1's 0.4 by 0.05"):
        check_gate(gate, _av(2, {"eval_loss": 0.45}), "prod", holder)
    tolerant = MetricGate("eval_loss", mode="min", no_worse_than_current=True, tolerance=0.1)
    check_gate(tolerant, _av(2, {"eval_loss": 0.45}), "prod", holder)
    assert "no current holder" in check_gate(gate, _av(2, {"eval_loss": 9.0}), "prod", None)


def test_gate_that_checks_nothing_or_has_no_direction_is_a_config_error():
    with pytest.raises(ConfigError, match="checks nothing"):
        MetricGate("eval_loss", mode="min")
    with pytest.raises(ConfigError, match="`mode`: Field required"):
        MetricGate("eval_loss", threshold=0.5)  # no default direction: a guess would pass what it should stop
    with pytest.raises(ConfigError, match="`mode`: Input should be 'min' or 'max'"):
        MetricGate("eval_loss", mode="lower", threshold=0.5)
    with pytest.raises(ConfigError, match="`threshold`: Input should be a finite number"):
        MetricGate("eval_loss", mode="min", threshold=float("nan"))


def test_one_gate_shape_in_the_spec_over_rest_and_in_python():
    """The spec's gate, the REST body's gate and the Python API's gate are the same type and the same JSON."""
    from peftray.jobspec import load_spec
    from peftray.service.adapters_api import PromoteBody

    as_json = {"metric": "eval_loss", "mode": "min", "threshold": 2.5, "no_worse_than_current": False,
               "tolerance": 0.0}
    spec = load_spec("jobs/tiny-lora-instruct.yaml", [f"registry.promote.gate={json.dumps(as_json)}"])
    body = PromoteBody.model_validate({"version": 1, "alias": "production", "gate": as_json})
    assert spec.registry.promote.gate == body.gate == MetricGate(**as_json)
    assert spec.registry.promote.gate.to_dict() == as_json
    with pytest.raises(ConfigError, match=r"registry\.promote\.gate`: MetricGate: `mode`: Field required"):
        load_spec("jobs/tiny-lora-instruct.yaml", ["registry.promote.gate={metric: eval_loss, threshold: 2.5}"])


def test_serving_base_mismatch_is_refused():
    check_base(_av(1, {}, base="org/llama"), "prod", "org/llama")
    with pytest.raises(GateError, match="trained on base model 'org/mistral' but 'prod' serves 'org/llama'"):
        check_base(_av(1, {}, base="org/mistral"), "prod", "org/llama")


@pytest.mark.parametrize("ref, expected", [
    ("a/3", ("a", 3, None)), ("a-b.c@production", ("a-b.c", None, "production")), ("models:/x@latest", ("x", None, "latest")),
])
def test_parse_ref(ref, expected):
    r = parse_ref(ref)
    assert (r.name, r.version, r.alias) == expected


@pytest.mark.parametrize("ref", ["a", "a/b", "a@", "@x", "a/3/4", ""])
def test_malformed_refs_are_not_found_with_the_syntax(ref):
    from peftray.errors import NotFoundError

    with pytest.raises(NotFoundError, match="name/<version>"):
        parse_ref(ref)
