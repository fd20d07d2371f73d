"""Bad input is refused with an error that says what and how to fix it, and leaves nothing half-registered."""

from __future__ import annotations

import json
import pickle

import pytest

from peftray import registry as R
from peftray.cli import main as cli
from peftray.errors import AdapterFormatError, ConfigError, GateError, NotFoundError, PeftrayError


def _model_exists(name, cfg) -> bool:
    return any(s.name == name for s in R.list_adapters(cfg))


def test_unknown_model_version_and_alias(cfg, lora_dir, unique_name):
    with pytest.raises(NotFoundError, match=f"adapter '{unique_name}' was not found"):
        R.resolve(f"{unique_name}@production", cfg)
    with pytest.raises(NotFoundError, match=f"adapter '{unique_name}' was not found"):
        R.promote(unique_name, 1, "production", config=cfg)
    with pytest.raises(NotFoundError):
        R.list_versions(unique_name, cfg)
    av = R.register_adapter(lora_dir(), unique_name, config=cfg)
    with pytest.raises(NotFoundError, match="has no alias 'production' .*aliases: none"):
        R.resolve(f"{unique_name}@production", cfg)
    with pytest.raises(NotFoundError, match=f"has no version {av.version + 5}"):
        R.resolve(f"{unique_name}/{av.version + 5}", cfg)
    with pytest.raises(NotFoundError, match=f"has no version {av.version + 5}"):
        R.promote(unique_name, av.version + 5, "staging", config=cfg)
    assert R.resolve(f"{unique_name}@latest", cfg).version == av.version
    with pytest.raises(ConfigError, match="alias must be"):
        R.promote(unique_name, av.version, "latest", config=cfg)


def test_version_of_another_base_is_refused_for_a_serving_alias(cfg, lora_dir, unique_name):
    llama = R.register_adapter(lora_dir("l", base="org/llama"), unique_name, config=cfg)
    other = R.register_adapter(lora_dir("m", base="org/mistral", seed=1), unique_name, config=cfg)
    R.promote(unique_name, llama.version, "production", serving_base="org/llama", config=cfg)
    with pytest.raises(GateError, match="trained on base model 'org/mistral' but 'production' serves 'org/llama'"):
        R.promote(unique_name, other.version, "production", serving_base="org/llama", config=cfg)
    assert R.resolve(f"{unique_name}@production", cfg).version == llama.version
    assert R.audit_log(unique_name, "production", cfg)[-1]["action"] == "refused"


def test_import_folder_without_adapter_config_is_refused(cfg, lora_dir, unique_name, capsys):
    d = lora_dir()
    (d / "adapter_config.json").unlink()
    rc = cli(["registry", "import", str(d), "--name", unique_name])
    assert rc == 1
    err = capsys.readouterr().err
    assert "has no adapter_config.json" in err and "Traceback" not in err
    assert not _model_exists(unique_name, cfg)


def test_pickle_only_adapter_is_refused(cfg, tmp_path, unique_name):
    d = tmp_path / "pk"
    d.mkdir()
    marker = tmp_path / "was-unpickled"
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterFormatError, match="only pickle weights"):
        R.register_adapter(d, unique_name, config=cfg)
    assert not marker.exists() and not _model_exists(unique_name, cfg)


class _Trap:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_failed_registration_leaves_nothing_behind(cfg, lora_dir, unique_name):
    fs = cfg.s3fs()
    with pytest.raises(NotFoundError, match="run 'no-such-run'"):
        R.register_adapter(lora_dir(), unique_name, run_id="no-such-run", config=cfg)
    # MLflow refuses this tag value only at version creation: after the run, the upload and the model exist.
    with pytest.raises(PeftrayError, match="MLflow refused registering .*nothing was kept.*exceeds"):
        R.register_adapter(lora_dir(), unique_name, tags={"big": "x" * 200_000}, config=cfg)
    assert not _model_exists(unique_name, cfg)
    leftovers = [p for p in fs.glob(f"{cfg.bucket}/mlflow-artifacts/*/*/artifacts/adapters/{unique_name}/**")]
    assert leftovers == []
    with pytest.raises(ConfigError, match="tag key 'bad!'"):
        R.register_adapter(lora_dir(), unique_name, tags={"bad!": "x"}, config=cfg)
    with pytest.raises(ConfigError, match="reserves"):
        R.register_adapter(lora_dir(), unique_name, tags={"peftray.files": "{}"}, config=cfg)
    with pytest.raises(ConfigError, match="must be finite"):
        R.register_adapter(lora_dir(), unique_name, metrics={"eval_loss": float("nan")}, config=cfg)
    with pytest.raises(ConfigError, match="adapter name"):
        R.register_adapter(lora_dir(), "bad/name", config=cfg)
