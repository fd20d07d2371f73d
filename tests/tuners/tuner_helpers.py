"""Inputs and comparisons shared by the tuner tests."""

from __future__ import annotations

import json

import torch


def llama_inputs():
    ids = torch.tensor([[5, 6, 7, 8, 9, 40], [10, 11, 12, 13, 14, 41]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def minilm_inputs():
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2178, 6251, 2182, 102, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


def read_config(path) -> dict:
    data = json.loads((path / "adapter_config.json").read_text())
    data.pop("peft_version", None)
    for key in ("target_modules", "feedforward_modules", "modules_to_save"):
        if isinstance(data.get(key), list):  # PEFT writes sets as lists in arbitrary order
            data[key] = sorted(data[key])
    return data
