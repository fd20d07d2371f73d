"""Bad input is refused early with messages that name the field, the value and what exists."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import peftray
from peftray.errors import AdapterFormatError, ConfigError


def _save(llama, path, **kw):
    cfg = peftray.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], **kw)
    peftray.get_peft_model(llama(), cfg).save_pretrained(path)
    return path


def test_target_modules_matching_nothing_names_existing_modules(llama):
    with pytest.raises(ConfigError, match="q_projection.*Module names that exist: .*q_proj"):
        peftray.get_peft_model(llama(), peftray.LoraConfig(target_modules=["q_projection"]))


@pytest.mark.parametrize("r", [0, -2])
def test_rank_must_be_positive(r):
    with pytest.raises(ConfigError, match=f"`r` must be a positive integer, got {r}"):
        peftray.LoraConfig(r=r)
    with pytest.raises(ConfigError, match="rank_pattern"):
        peftray.LoraConfig(r=4, rank_pattern={"q_proj": 0})


def test_unknown_task_and_method(tmp_path):
    with pytest.raises(ConfigError, match="task_type.*CAUSAL_LM.*got 'CAUSAL'"):
        peftray.LoraConfig(task_type="CAUSAL")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(ConfigError, match="unknown PEFT method.*LOHA.*LORA"):
        peftray.read_adapter(tmp_path)


def test_unsupported_peft_feature_is_refused(tmp_path, llama):
    path = _save(llama, tmp_path / "a")
    data = json.loads((path / "adapter_config.json").read_text())
    data["use_qalora"] = True
    (path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="use_qalora"):
        peftray.read_adapter(path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, llama, tiny_model):
    path = _save(llama, tmp_path / "a")
    config, state = peftray.read_adapter(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(4, 32)
    with pytest.raises(AdapterFormatError, match=r"q_proj\.lora_A\.weight.*\(4, 32\).*\(4, 64\)"):
        peftray.PeftModel.from_pretrained(llama(), (config, state))


def test_adapter_for_another_base_model_warns_or_refuses(tmp_path, llama):
    path = _save(llama, tmp_path / "a")
    data = json.loads((path / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = "someone/other-model"
    (path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="other-model"):
        peftray.PeftModel.from_pretrained(llama(), path)
    with pytest.raises(AdapterFormatError, match="other-model"):
        peftray.PeftModel.from_pretrained(llama(), path, on_base_mismatch="error")


def test_missing_and_truncated_safetensors(tmp_path, llama):
    path = _save(llama, tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterFormatError, match="truncated or corrupt"):
        peftray.read_adapter(path)
    weights.unlink()
    with pytest.raises(AdapterFormatError, match="no adapter_model.safetensors"):
        peftray.PeftModel.from_pretrained(llama(), path)
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        peftray.read_adapter(tmp_path / "nothing-here")


class _Boom:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_adapter_is_refused_without_unpickling(tmp_path, llama):
    path = _save(llama, tmp_path / "a")
    (path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (path / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(AdapterFormatError, match="pickle"):
        peftray.PeftModel.from_pretrained(llama(), path)
    assert not marker.exists()


def test_incomplete_adapter_lists_missing_tensors(tmp_path, llama):
    path = _save(llama, tmp_path / "a")
    config, state = peftray.read_adapter(path)
    del state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    with pytest.raises(AdapterFormatError, match="layers.1.self_attn.v_proj.lora_B.weight"):
        peftray.PeftModel.from_pretrained(llama(), (config, state))


def test_failed_load_adapter_leaves_model_unchanged(tmp_path, llama):
    path = _save(llama, tmp_path / "a")
    model = peftray.PeftModel.from_pretrained(llama(), path)
    config, state = peftray.read_adapter(path)
    state.pop(next(iter(state)))
    with pytest.raises(AdapterFormatError):
        model.load_adapter((config, state), adapter_name="broken")
    assert list(model.peft_config) == ["default"]
