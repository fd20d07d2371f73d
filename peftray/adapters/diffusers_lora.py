"""Diffusers' LoRA layout for pipelines, beside the HF PEFT one: `pytorch_lora_weights.safetensors`.

`StableDiffusionPipeline.load_lora_weights(folder)` reads only this file (an HF PEFT folder alone loads
without an error and changes nothing). Its tensors are the UNet's HF PEFT tensors with `base_model.model.`
replaced by `unet.`; the LoRA config travels in the safetensors metadata `lora_adapter_metadata`, as a JSON
object whose keys carry the same `unet.` prefix (what diffusers 0.42 writes and reads). A text-encoder adapter
(text_to_image with `adapter.text_encoder_target_modules`) joins the same file under `text_encoder.`, tensors
and metadata alike, as `StableDiffusionPipeline.save_lora_weights(text_encoder_lora_layers=...)` writes it. A file without that
metadata (older diffusers, other trainers) gets r from the tensor shapes and lora_alpha = r, as diffusers does.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from peftray.errors import AdapterFormatError

DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PEFT_PREFIX = "base_model.model."
UNET = "unet."
TEXT_ENCODER = "text_encoder."
TEXT_ENCODER_DIR = "text_encoder"  # a text encoder's HF PEFT adapter, inside the UNet adapter's folder


def to_diffusers(config: dict[str, Any], state: dict[str, torch.Tensor],
                 text_encoder: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, safetensors metadata) of the diffusers file for a UNet adapter's HF PEFT config and tensors, and
    optionally the text encoder's (config, tensors)."""
    tensors, meta = {}, {}
    for prefix, part in ((UNET, (config, state)), (TEXT_ENCODER, text_encoder)):
        if part is None:
            continue
        odd = [k for k in part[1] if not k.startswith(PEFT_PREFIX)]
        if odd:
            raise AdapterFormatError(f"tensor names {odd[:3]} do not start with {PEFT_PREFIX!r}: not a "
                                     f"{prefix[:-1]} LoRA adapter")
        tensors.update({prefix + k[len(PEFT_PREFIX):]: v.detach().contiguous().cpu() for k, v in part[1].items()})
        meta.update({prefix + k: v for k, v in part[0].items()})
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)}


def from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict | None,
                   where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF PEFT config dict, HF PEFT-named tensors) of a diffusers LoRA file's UNet part.

    Raises:
        AdapterFormatError: the file holds text-encoder tensors (not supported), no UNet tensors, or
            tensors that are not LoRA A/B matrices.
    """
    other = sorted(k for k in tensors if not k.startswith(UNET))
    if other:
        raise AdapterFormatError(f"{where} holds tensors outside the UNet ({other[:2]}...); peftray loads UNet "
                                 "LoRA only. Save the adapter with unet_lora_layers alone")
    if not tensors:
        raise AdapterFormatError(f"{where} holds no UNet LoRA tensors")
    state = {PEFT_PREFIX + k[len(UNET):]: v for k, v in tensors.items()}
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw:
        config = {k[len(UNET):]: v for k, v in json.loads(raw).items() if k.startswith(UNET)}
        config.setdefault("peft_type", "LORA")
        return config, state
    return _inferred_config(state, where), state


def _inferred_config(state: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    ranks: set[int] = set()
    targets: set[str] = set()
    for key, value in state.items():
        module, _, tail = key[len(PEFT_PREFIX):].rpartition(".lora_")
        if tail not in ("A.weight", "B.weight"):
            raise AdapterFormatError(f"{where}: tensor {key!r} is not a LoRA A/B weight; peftray reads those only")
        if tail == "A.weight":
            ranks.add(int(value.shape[0]))
        parts = module.split(".")
        targets.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])  # to_out.0 keeps its index
    if len(ranks) != 1:
        raise AdapterFormatError(f"{where}: LoRA ranks differ between modules ({sorted(ranks)}) and the file has "
                                 "no lora_adapter_metadata; save it with diffusers >= 0.34")
    r = ranks.pop()
    return {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": sorted(targets)}
