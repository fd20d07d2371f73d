"""Register -> staging -> gated production -> refused promotion -> rollback, on the real MLflow server and S3."""

from __future__ import annotations

import hashlib

import pytest

from peftray import registry as R
from peftray.errors import GateError, NotFoundError
from peftray.registry.validate import sha256_file


def _digests(folder):
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*") if p.is_file()}


def _holder(name, alias, cfg):
    """Alias -> exactly one version, whose fetched bytes are the registered ones."""
    av = R.resolve(f"{name}@{alias}", cfg)
    assert alias in av.aliases
    holders = [v.version for v in R.list_versions(name, cfg) if alias in v.aliases]
    assert holders == [av.version]
    assert _digests(R.fetch(av, cfg)) == av.files
    return av.version


def test_register_promote_gate_rollback(cfg, lora_dir, unique_name):
    name = unique_name
    originals = {}
    versions = []
    for i, loss in enumerate([0.50, 0.40, 0.45]):
        d = lora_dir(f"v{i}", seed=i)
        originals[i] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}
        av = R.register_adapter(d, name, job_name=f"job-{i}", metrics={"eval_loss": loss, "acc": 0.8 + i / 100},
                                dataset_fingerprint=f"ds{i}", tags={"team": "nlp"}, config=cfg)
        assert av.files == originals[i]
        assert (av.base_model, av.method, av.rank, av.target_modules) == ("tiny-llama", "lora", 4, ["q_proj", "v_proj"])
        assert av.tags["team"] == "nlp" and av.dataset_fingerprint == f"ds{i}" and av.job_name == f"job-{i}"
        versions.append(av.version)
    v1, v2, v3 = versions
    # Idempotent: same bytes + same job -> the same version, no new one.
    again = R.register_adapter(lora_dir("v0"), name, job_name="job-0", metrics={"eval_loss": 0.5}, config=cfg)
    assert again.version == v1 and len(R.list_versions(name, cfg)) == 3
    # The stored bytes are the registered ones (read straight from S3, not through peftray).
    fs = cfg.s3fs()
    s3 = R.resolve(f"{name}/{v1}", cfg).tags["peftray.s3_uri"]
    assert hashlib.sha256(fs.cat(f"{s3}/adapter_model.safetensors")).hexdigest() == originals[0]["adapter_model.safetensors"]

    R.promote(name, v1, "staging", actor="alice", reason="first", config=cfg)
    assert _holder(name, "staging", cfg) == v1
    gate = R.MetricGate("eval_loss", mode="min", threshold=0.45, no_worse_than_current=True)
    R.promote(name, v1, "production", gate=R.MetricGate("acc", mode="max", threshold=0.8), config=cfg)
    state1 = R.alias_state(name, "production", cfg)
    rec = R.promote(name, v2, "production", gate=gate, actor="bob", reason="better loss", config=cfg)
    assert (rec["from_version"], rec["version"], rec["actor"]) == (v1, v2, "bob")
    assert _holder(name, "production", cfg) == v2
    state2 = R.alias_state(name, "production", cfg)
    assert state2[0] == v2 and state2[1] != state1[1]
    # v3 (0.45) passes the threshold but is worse than the holder v2 (0.40): refused, by how much.
    with pytest.raises(GateError, match=r"'eval_loss' = 0.45 is worse than the current holder .*/2's 0.4 by 0.05"):
        R.promote(name, v3, "production", gate=gate, config=cfg)
    assert _holder(name, "production", cfg) == v2
    assert R.alias_state(name, "production", cfg) == state2  # a refusal changes nothing a poller sees
    R.promote(name, v3, "production", actor="carol", config=cfg)  # no gate
    assert _holder(name, "production", cfg) == v3
    back = R.rollback(name, "production", actor="dave", reason="regression", config=cfg)
    assert (back["from_version"], back["version"]) == (v3, v2)
    assert _holder(name, "production", cfg) == v2
    assert R.rollback(name, "production", config=cfg)["version"] == v1
    assert _holder(name, "production", cfg) == v1
    with pytest.raises(NotFoundError, match="no earlier holder"):
        R.rollback(name, "production", config=cfg)
    log = R.audit_log(name, "production", cfg)
    assert [(e["action"], e["version"], e["from_version"]) for e in log] == [
        ("promote", v1, None), ("promote", v2, v1), ("refused", v3, v2), ("promote", v3, v2),
        ("rollback", v2, v3), ("rollback", v1, v2)]
    assert [e["seq"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert log[1]["actor"] == "bob" and log[1]["reason"] == "better loss" and log[1]["at"]
    # Promotion never copies artifacts: the alias' source is the registered version's.
    assert R.resolve(f"{name}@production", cfg).source == R.resolve(f"{name}/{v1}", cfg).source
    # The version's bytes never changed through all of it.
    assert _digests(R.fetch(f"{name}/{v1}", cfg)) == originals[0]


def test_browse_and_diff(cfg, lora_dir, unique_name):
    a = R.register_adapter(lora_dir("a", rank=4), unique_name, metrics={"eval_loss": 0.5}, config=cfg)
    b = R.register_adapter(lora_dir("b", rank=8, lora_alpha=32), unique_name, metrics={"eval_loss": 0.3, "acc": 0.9},
                           job_name="j2", config=cfg)
    R.promote(unique_name, b.version, "staging", config=cfg)
    summary = next(s for s in R.list_adapters(cfg) if s.name == unique_name)
    assert summary.latest_version == b.version and summary.aliases == {"staging": b.version}
    assert [(v.version, v.aliases) for v in R.list_versions(unique_name, cfg)] == [(a.version, []),
                                                                                   (b.version, ["staging"])]
    d = R.diff_versions(unique_name, a.version, b.version, cfg)
    assert d["metrics"]["eval_loss"]["delta"] == pytest.approx(-0.2)
    assert d["metrics"]["acc"] == {"v1": None, "v2": 0.9, "delta": None}
    assert d["fields"]["rank"] == {"v1": 4, "v2": 8}
    assert d["config"]["r"] == {"v1": 4, "v2": 8} and d["config"]["lora_alpha"] == {"v1": 8, "v2": 32}
    assert set(d["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert "target_modules" not in d["fields"]
