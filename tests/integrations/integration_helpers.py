"""Constants and checks shared by the Trainer / TRL / Accelerate tests (imported by name: conftest modules of
several test folders would collide)."""

from __future__ import annotations

import torch

TARGETS = ["q_proj", "v_proj", "down_proj"]
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds fly over the sea", "fish swim in the river",
         "the sun is warm today", "snow falls in the winter", "we read a book at night", "trees grow tall and green"]


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}


def saved_adapter_matches(model, ref, folder, ids) -> bool:
    """`folder` holds exactly `model`'s live adapter tensors, and `ref` (HF PEFT, loaded from it) computes what
    `model` does, under bf16 autocast on both: a trainer or Accelerate with bf16 leaves its autocast wrapper on
    the model's forward."""
    import os

    from safetensors.torch import load_file

    saved, live = load_file(os.path.join(folder, "adapter_model.safetensors")), model.get_adapter_state_dict()
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k].detach()) for k in saved)
    model.eval()
    ref.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
    return bool((got - want).abs().max() <= 2e-2 * want.abs().max())
