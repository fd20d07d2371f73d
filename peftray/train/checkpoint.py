"""Training checkpoints: the adapter (HF-PEFT folder) + optimizer + scheduler + step + RNG, in one folder.

Layout of a checkpoint folder (uploaded by Ray Train to `<bucket>/train/<owner>/<job name>-<spec fp>/checkpoint_*`):
    adapter/adapter_config.json, adapter/adapter_model.safetensors   what gets registered at the end
    trainer_state.pt   {"step", "trainable", "optimizer", "scheduler", "rng"}; loaded with weights_only=True
    reference_logps.safetensors   dpo with `reference: precomputed`: the reference log-probs, so a resumed
                       run does not recompute them
    meta.json          {"step", "metrics"} for people browsing the bucket
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
REFERENCE_FILE = "reference_logps.safetensors"
# Every file of a checkpoint: a folder in storage holding all of them was uploaded whole (each S3 PUT is atomic).
FILES = (STATE_FILE, "meta.json", f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/adapter_model.safetensors")
PREFIX = "checkpoint_"


def folder_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def step_of(path: str) -> int:
    """The step in a checkpoint folder's name (`.../checkpoint_000015` -> 15); -1 for any other name."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    digits = name[len(PREFIX):]
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else -1


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def save(folder: Path, model, optimizer, scheduler, step: int, metrics: dict,
         reference: torch.Tensor | None = None) -> Path:
    """Write a checkpoint of `model` (the PeftModel, unwrapped from DDP) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if reference is not None:
        from safetensors.torch import save_file

        save_file({"logps": reference.contiguous()}, str(folder / REFERENCE_FILE))
    model.save_pretrained(folder / ADAPTER_DIR)
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"step": step, "trainable": trainable, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state()}, folder / STATE_FILE)
    (folder / "meta.json").write_text(json.dumps({"step": step, "metrics": metrics}, indent=2))
    return folder


def restore(folder: Path, model, optimizer, scheduler) -> int:
    """Load a checkpoint into `model`, `optimizer` and `scheduler`; return the step it was taken after."""
    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    missing = [n for n in params if params[n].requires_grad and n not in state["trainable"]]
    if missing:
        raise RuntimeError(f"checkpoint {folder} does not fit this adapter: no value for {missing[:3]}")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def load_reference(folder: Path) -> torch.Tensor | None:
    """The precomputed reference log-probs saved with a checkpoint, or None."""
    path = Path(folder) / REFERENCE_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))["logps"]


def storage_filesystem(cfg):
    """A pyarrow S3 filesystem for a `peftray.endpoints.Config`'s endpoint (Ray Train's checkpoint storage)."""
    import os
    from urllib.parse import urlparse

    import pyarrow.fs as pafs

    kwargs: dict = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if cfg.aws_access_key_id:
        kwargs.update(access_key=cfg.aws_access_key_id, secret_key=cfg.aws_secret_access_key)
    if cfg.s3_endpoint_url:
        url = urlparse(cfg.s3_endpoint_url)
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme or "http")
    return pafs.S3FileSystem(**kwargs)
