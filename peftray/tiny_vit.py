"""A tiny ViT image classifier made offline: `make_tiny_vit(path, labels)` writes a folder that
`transformers.ViTForImageClassification.from_pretrained(path)` and `AutoImageProcessor.from_pretrained(path)` load.

No model hub is reachable where peftray is tested, so the image classification tests and examples train on
this: 32x32 images in 8x8 patches, hidden size 64, 2 layers of 4 heads, a classifier head over `labels`, and a
ViT image processor that resizes to 32x32 and scales pixels to [-1, 1]. The weights are random but seeded, so
the folder is the same on every machine; a training step on 16 images takes tens of milliseconds on one core.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from peftray.base_models import build_model_folder

TINY_VIT_VERSION = 1  # bump when the recipe changes, so cached folders are rebuilt


@dataclass(frozen=True)
class TinyViTSpec:
    """Sizes of the tiny ViT: square `image_size` inputs cut into `patch_size` patches ((32 / 8)^2 = 16 tokens
    plus the CLS token), then `num_hidden_layers` blocks of `num_attention_heads` heads over `hidden_size`
    channels, each with an MLP twice as wide. `seed` draws the random weights."""

    image_size: int = 32
    patch_size: int = 8

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    seed: int = 0


def _write(spec: TinyViTSpec, labels: list[str], out: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        intermediate_size=2 * spec.hidden_size, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)})
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = ViTForImageClassification(config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    size = {"height": spec.image_size, "width": spec.image_size}
    ViTImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)


def make_tiny_vit(path: str | os.PathLike, labels: list[str], spec: TinyViTSpec | None = None,
                  overwrite: bool = False) -> Path:
    """Write the tiny ViT classifier over `labels` (class names in id order) to `path` and return it.

    Idempotent (a folder already made with the same spec and labels is reused) and atomic (see
    `build_model_folder`).
    """
    spec = spec or TinyViTSpec()
    labels = [str(name) for name in labels]
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be at least two distinct class names, got {labels}")
    marker = {"peftray_tiny_vit": TINY_VIT_VERSION, **asdict(spec), "labels": labels}
    return build_model_folder(path, marker, lambda tmp: _write(spec, labels, tmp), overwrite, "tiny ViT")
