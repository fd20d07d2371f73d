"""`dataset.format: image_caption` and `image_classification`: rows of an image and its caption or class label.

A row's image (`dataset.image_field`) is a path relative to the dataset file's folder (the usual
`metadata.jsonl` beside an `images/` folder), an absolute path, an `s3://` URI, a `data:image/...;base64,`
string, raw bytes (parquet) or `{"bytes": ...}` (a Hugging Face `Image` feature). Pillow decodes it to RGB.

image_classification: the base model's own image processor (`AutoImageProcessor`, preprocessor_config.json)
resizes and normalizes it, so training sees what inference with that processor sees; the label
(`dataset.label_field`) maps to an id as in `classification` (`dataset.labels`, else the sorted names). A
class folder's rows carry absolute paths or s3:// URIs (peftray.data.sources).

image_caption: the image is resized to the model's square input size and scaled to [-1, 1] (what Stable
Diffusion's VAE takes). The caption (`dataset.caption_field`) is tokenized padded to the tokenizer's `model_max_length`, as
the pipeline does at generation time. A bad image or an empty caption fails before training, naming the row.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import torch

from peftray.data.formats import label_id
from peftray.errors import ConfigError
from peftray.jobspec import DatasetSpec

PROCESSOR_CHUNK = 64  # images per image-processor call


def encode_image_captions(rows: list[dict], ds: DatasetSpec, tokenizer, image_size: int,
                          numbers: list[int] | None = None, config=None) -> list[dict[str, Any]]:
    """Examples `{"pixel_values": [3, S, S] float tensor in [-1, 1], "input_ids": [...], "caption": str}`.

    Raises:
        ConfigError: an image is missing or not decodable, or a caption is empty (naming the row and file).
    """
    numbers = numbers or list(range(1, len(rows) + 1))
    out = []
    for n, row in zip(numbers, rows):
        where = f"{ds.source} row {n}"
        caption = row.get(ds.caption_field)
        if not isinstance(caption, str) or not caption.strip():
            raise ConfigError(f"{where}: `{ds.caption_field}` must be a non-empty caption, got {caption!r}")
        pixels = to_pixels(read_image(row.get(ds.image_field), ds, where, config), image_size)
        ids = tokenizer(caption, padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length)["input_ids"]
        out.append({"pixel_values": pixels, "input_ids": list(ids), "caption": caption})
    return out


def encode_image_labels(rows: list[dict], ds: DatasetSpec, processor, names: list[str],
                        numbers: list[int] | None = None, config=None) -> list[dict[str, Any]]:
    """Examples `{"pixel_values": [3, H, W] float tensor as `processor` makes it, "label": class id}`.

    Raises:
        ConfigError: a label is not one of `names`, or an image is missing or not decodable (naming the row
            and the file).
    """
    numbers = numbers or list(range(1, len(rows) + 1))
    out: list[dict[str, Any]] = []
    for start in range(0, len(rows), PROCESSOR_CHUNK):
        images, labels = [], []
        for n, row in zip(numbers[start:start + PROCESSOR_CHUNK], rows[start:start + PROCESSOR_CHUNK]):
            where = f"{ds.source} row {n}"
            labels.append(label_id(where, row.get(ds.label_field), ds, names))
            images.append(read_image(row.get(ds.image_field), ds, where, config))
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        out += [{"pixel_values": p.float(), "label": k} for p, k in zip(pixels, labels)]
    return out


def read_image(value: Any, ds: DatasetSpec, where: str, config=None):
    """The PIL image a row's image cell names or holds; ConfigError naming `where` and the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    data, what = _image_bytes(value, ds, where, config)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {what} is not an image Pillow can decode ({exc}); fix or drop the row") from None
    return image.convert("RGB")


def _image_bytes(value: Any, ds: DatasetSpec, where: str, config) -> tuple[bytes, str]:
    if isinstance(value, dict) and value.get("bytes") is not None:
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), f"`{ds.image_field}` ({len(value)} bytes)"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: `{ds.image_field}` must be an image path, s3:// URI, data: URI or bytes, "
                          f"got {str(value)[:60]!r}")
    if value.startswith("data:"):
        try:
            return base64.b64decode(value.split(",", 1)[1], validate=True), f"`{ds.image_field}` (data URI)"
        except (IndexError, ValueError):
            raise ConfigError(f"{where}: `{ds.image_field}` is a data: URI without valid base64 content") from None
    if value.startswith("s3://") or ds.source.startswith("s3://"):
        return _s3_bytes(value, ds, where, config), value
    path = Path(value) if Path(value).is_absolute() else Path(ds.source.removeprefix("file://")).parent / value
    if not path.is_file():
        raise ConfigError(f"{where}: image file {value} does not exist (looked for {path.absolute()})")
    return path.read_bytes(), f"image file {path}"


def _s3_bytes(value: str, ds: DatasetSpec, where: str, config) -> bytes:
    from peftray.endpoints import load_config

    uri = value if value.startswith("s3://") else f"{ds.source.rsplit('/', 1)[0]}/{value}"
    fs = (config or load_config()).s3fs()
    try:
        return fs.cat_file(uri[len("s3://"):])
    except FileNotFoundError:
        raise ConfigError(f"{where}: image {uri} does not exist in object storage") from None


def to_pixels(image, size: int) -> torch.Tensor:
    """A PIL RGB image as a [3, size, size] float32 tensor in [-1, 1] (bilinear resize, no crop)."""
    import numpy as np
    from PIL import Image

    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
