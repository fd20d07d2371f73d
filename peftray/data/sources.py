"""Rows from where a job spec says they are: a local file, an s3:// object, or a hub dataset id.

Files are read as bytes first, so the dataset fingerprint is the sha256 of exactly those bytes; hub
datasets go through `datasets.load_dataset` and are fingerprinted by their rows. An image classification
set may also be a folder (local or s3://) holding one folder per class: each image becomes a row
`{image_field: its path or URI, label_field: its folder's name}`, fingerprinted by the names and bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftray.errors import ConfigError
from peftray.jobspec import DatasetSpec

FILE_TYPES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class SourceRows:
    """The raw rows of a dataset, split into train and eval, and the fingerprint of what was read."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    fingerprint: str
    columns: list[str]
    train_rows: list[int] | None = None  # each train row's number in the source (1 = first), for errors
    eval_rows: list[int] | None = None


def load_rows(ds: DatasetSpec, config=None, seed: int = 0) -> SourceRows:
    """Read the dataset named by `ds.source` and split off the eval rows.

    Args:
        ds: the job spec's `dataset` section.
        config: a `peftray.endpoints.Config` (S3 endpoint and credentials); default `load_config()` when needed.
        seed: shuffles rows before taking `eval_fraction` of them, so the split is the same on every worker.

    Raises:
        ConfigError: missing file, unknown file type, unreadable content, or no rows.
    """
    if ds.reads_file or is_class_folder(ds.source, ds):
        if ds.eval_split:
            raise ConfigError(f"`dataset.eval_split` applies to hub datasets, got {ds.eval_split!r} for the file "
                              f"{ds.source}; use dataset.eval_fraction instead")
        rows, raw = _read_source(ds.source, ds, config)
        fingerprint = hashlib.sha256(raw).hexdigest()
        eval_rows: list[dict[str, Any]] | None = None
        if ds.eval_source:  # a file of its own (the OpenAI API's validation_file)
            eval_rows, raw_eval = _read_source(ds.eval_source, ds, config)
            fingerprint = hashlib.sha256(raw + raw_eval).hexdigest()
    else:
        rows = _hub_rows(ds, ds.split)
        eval_rows = _hub_rows(ds, ds.eval_split) if ds.eval_split else None
        fingerprint = _rows_digest(rows + (eval_rows or []))
    if ds.max_rows:
        rows = rows[: ds.max_rows]
    if not rows:
        raise ConfigError(f"`dataset.source` {ds.source} has no rows")
    columns = list(rows[0].keys())
    numbers = list(range(1, len(rows) + 1))
    if eval_rows is not None:
        return SourceRows(rows, eval_rows, f"sha256:{fingerprint}", columns, numbers,
                          list(range(1, len(eval_rows) + 1)))
    (rows, train_n), (eval_rows, eval_n) = split_eval(list(zip(rows, numbers)), ds.eval_fraction, seed)
    return SourceRows(rows, eval_rows, f"sha256:{fingerprint}", columns, train_n, eval_n)


def split_eval(rows: list, fraction: float, seed: int) -> tuple[tuple[list, list], tuple[list, list]]:
    """A seeded shuffle, then the first `fraction` of rows (at least one when fraction > 0) become eval rows.

    `rows` are (row, number) pairs; returns ((train rows, numbers), (eval rows, numbers)) in source order.
    """
    if fraction <= 0:
        return (tuple(map(list, zip(*rows))) if rows else ([], [])), ([], [])
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise ConfigError(f"`dataset.eval_fraction` {fraction} leaves no training rows out of {len(rows)}; lower it")
    eval_idx = set(order[:n_eval])
    train = [pair for i, pair in enumerate(rows) if i not in eval_idx]
    evals = [pair for i, pair in enumerate(rows) if i in eval_idx]
    return ([p[0] for p in train], [p[1] for p in train]), ([p[0] for p in evals], [p[1] for p in evals])


def is_class_folder(source: str, ds: DatasetSpec) -> bool:
    """True when `source` is an image classification folder (one folder per class) rather than a file."""
    if ds.format != "image_classification" or Path(source).suffix.lower() in FILE_TYPES:
        return False
    return source.startswith("s3://") or Path(source.removeprefix("file://")).is_dir()


def _read_source(source: str, ds: DatasetSpec, config) -> tuple[list[dict[str, Any]], bytes]:
    """The rows of a file or class folder, and the bytes its fingerprint is taken of."""
    if is_class_folder(source, ds):
        return _class_folder_rows(source, ds, config)
    raw = _read_bytes(source, config)
    return _parse(raw, source), raw


def _class_folder_rows(source: str, ds: DatasetSpec, config) -> tuple[list[dict[str, Any]], bytes]:
    """Rows `{image_field: absolute path or s3:// URI, label_field: class folder name}`, sorted by path."""
    files = _folder_files(source, config)
    rows, digest = [], hashlib.sha256()
    for rel, (uri, read) in sorted(files.items()):
        if not rel.lower().endswith(IMAGE_SUFFIXES):
            continue  # a README or a metadata file beside the class folders
        if "/" not in rel:
            raise ConfigError(f"`dataset.source` {source}: the image {rel} is not inside a class folder; the "
                              "layout is one folder per class (<source>/<label>/<image>). Move it into one")
        digest.update(rel.encode() + b"\0" + hashlib.sha256(read()).digest())
        rows.append({ds.image_field: uri, ds.label_field: rel.split("/", 1)[0]})
    if not rows:
        raise ConfigError(f"`dataset.source` {source} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class "
                          "folders; the layout is <source>/<label>/<image>")
    return rows, digest.digest()


def _folder_files(source: str, config) -> dict[str, tuple[str, Any]]:
    """{path relative to `source`: (absolute path or s3:// URI, a function reading its bytes)}."""
    if source.startswith("s3://"):
        from peftray.endpoints import load_config

        fs = (config or load_config()).s3fs()
        root = source[len("s3://"):].rstrip("/")
        keys = fs.find(root)
        if not keys:
            raise ConfigError(f"`dataset.source` {source} does not exist in object storage (or is empty)")
        return {k[len(root) + 1:]: (f"s3://{k}", lambda k=k: fs.cat_file(k)) for k in keys}
    root = Path(source.removeprefix("file://")).absolute()
    return {p.relative_to(root).as_posix(): (str(p), p.read_bytes) for p in root.rglob("*") if p.is_file()}


def _read_bytes(source: str, config) -> bytes:
    if source.startswith("s3://"):
        from peftray.endpoints import load_config

        fs = (config or load_config()).s3fs()
        try:
            return fs.cat_file(source[len("s3://"):])
        except FileNotFoundError:
            raise ConfigError(f"`dataset.source` {source} does not exist in object storage; upload it or fix "
                              "the URI") from None
    path = Path(source.removeprefix("file://"))
    if not path.is_file():
        raise ConfigError(f"`dataset.source` file {source} does not exist (resolved to {path.absolute()}); "
                          "fix the path in the job spec or pass dataset.source=PATH")
    return path.read_bytes()


def _parse(raw: bytes, source: str) -> list[dict[str, Any]]:
    kind = FILE_TYPES.get(Path(source).suffix.lower())
    if kind is None:
        raise ConfigError(f"`dataset.source` {source}: unknown file type; use one of {', '.join(FILE_TYPES)}")
    try:
        if kind == "jsonl":
            return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        if kind == "json":
            data = json.loads(raw)
            return data if isinstance(data, list) else data.get("data") or data.get("rows") or []
        import pandas as pd

        reader = pd.read_csv if kind == "csv" else pd.read_parquet
        frame = reader(io.BytesIO(raw))
        return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"`dataset.source` {source} is not valid {kind}: {exc}") from None


def _plain(value: Any) -> Any:
    # pandas hands back numpy scalars and arrays; the formatters want plain Python values
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _hub_rows(ds: DatasetSpec, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_dataset(ds.source, ds.subset, split=split)
    except FileNotFoundError as exc:
        raise ConfigError(f"`dataset.source` {ds.source!r} is neither a local file nor a reachable hub dataset "
                          f"({exc}); check the path or id") from None
    except ValueError as exc:
        raise ConfigError(f"`dataset.source` {ds.source!r} split {split!r}: {exc}") from None
    return [dict(row) for row in loaded]


def _rows_digest(rows: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()
