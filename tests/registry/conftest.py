"""Fixtures for the registry tests: a per-test cache folder and adapter folders written with safetensors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest


def write_lora(path: Path, *, base: str = "tiny-llama", seed: int = 0, rank: int = 4, **config) -> Path:
    """An HF-PEFT-format LoRA folder (q_proj/v_proj of 2 layers, hidden 64) with a config JSON.

    Written with safetensors' numpy API: the same file format as torch's, without importing torch.
    """
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, 64), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((64, rank), dtype=np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
           "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": base, "lora_dropout": 0.0}
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return path


@pytest.fixture
def cfg(stack, tmp_path, monkeypatch):
    """The session stack's Config with a cache folder of this test's own (so every test starts cold).

    Also exported as PEFTRAY_CACHE_DIR, so the CLI (which loads its own config) uses the same cache.
    """
    monkeypatch.setenv("PEFTRAY_CACHE_DIR", str(tmp_path / "cache"))
    return dataclasses.replace(stack, cache_dir=tmp_path / "cache")


@pytest.fixture
def lora_dir(tmp_path):
    return lambda name="a", **kw: write_lora(tmp_path / name, **kw)
