"""Datasets for training jobs: read (local file, s3://, hub id), split, tokenize by format, batch.

`prepare_data(spec, tokenizer)` is what the trainer calls on every worker; it fails fast, before any
training starts, on a missing file, wrong column names or a prompt longer than `dataset.max_seq_len`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftray.data.batches import BatchPlan, collate, eval_batches, total_steps
from peftray.data.formats import IGNORE, check_columns, encode_rows, label_names
from peftray.data.images import encode_image_captions, encode_image_labels
from peftray.data.preference import Skipped, encode_preferences
from peftray.errors import ConfigError
from peftray.data.sources import SourceRows, load_rows, split_eval

__all__ = ["IGNORE", "BatchPlan", "PreparedData", "Skipped", "SourceRows", "collate", "eval_batches", "load_rows",
           "prepare_data", "split_eval", "total_steps"]


@dataclass
class PreparedData:
    """Tokenized train and eval examples, the dataset fingerprint and (classification) the class names."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    fingerprint: str
    label_names: list[str] | None = None
    skipped: Skipped | None = None  # preference pairs left out (identical, truncated to nothing)

    @property
    def train_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.train)


def prepare_data(spec, tokenizer, config=None, image_size: int | None = None,
                 image_processor=None) -> PreparedData:
    """Load, split and tokenize `spec.dataset` with `tokenizer`.

    Args:
        spec: the `JobSpec` (its `dataset` section and `training.seed` are used).
        tokenizer: the base model's tokenizer (None for image_classification).
        config: a `peftray.endpoints.Config` for s3:// sources; default `load_config()`.
        image_size: image_caption: the square size images are resized to (the model's input).
        image_processor: image_classification: the base model's image processor (resize, normalize).

    Raises:
        ConfigError: the source is missing, a column is missing (the message lists those that exist),
            a label is unknown, or a prompt does not fit `max_seq_len` (the message names the row).
    """
    ds = spec.dataset
    rows = load_rows(ds, config, seed=spec.training.seed)
    check_columns(rows.train, ds, rows.columns)
    if ds.format == "image_caption":
        return _image_captions(spec, tokenizer, rows, config, image_size)
    if ds.format == "image_classification":
        return _image_labels(spec, image_processor, rows, config)
    if ds.format == "preference":
        skipped = Skipped()
        train = encode_preferences(rows.train, ds, tokenizer, rows.train_rows, skipped)
        evals = encode_preferences(rows.eval, ds, tokenizer, rows.eval_rows, skipped)
        if not train:
            raise ConfigError(f"{skipped.describe(ds.source)}: no preference pair is left to train on")
        return PreparedData(train=train, eval=evals, fingerprint=rows.fingerprint, skipped=skipped)
    names = label_names(rows.train + rows.eval, ds) if ds.format == "classification" else None
    train = encode_rows(rows.train, ds, tokenizer, names, rows.train_rows)
    evals = encode_rows(rows.eval, ds, tokenizer, names, rows.eval_rows)
    return PreparedData(train=train, eval=evals, fingerprint=rows.fingerprint, label_names=names)


def _image_captions(spec, tokenizer, rows: SourceRows, config, image_size: int | None) -> PreparedData:
    if not image_size:
        raise ConfigError("dataset.format 'image_caption' needs the model's image size; use task text_to_image")
    ds = spec.dataset
    train = encode_image_captions(rows.train, ds, tokenizer, image_size, rows.train_rows, config)
    evals = encode_image_captions(rows.eval, ds, tokenizer, image_size, rows.eval_rows, config)
    return PreparedData(train=train, eval=evals, fingerprint=rows.fingerprint)


def _image_labels(spec, processor, rows: SourceRows, config) -> PreparedData:
    if processor is None:
        raise ConfigError("dataset.format 'image_classification' needs the model's image processor; use task image_cls")
    ds = spec.dataset
    names = label_names(rows.train + rows.eval, ds)
    train = encode_image_labels(rows.train, ds, processor, names, rows.train_rows, config)
    evals = encode_image_labels(rows.eval, ds, processor, names, rows.eval_rows, config)
    return PreparedData(train=train, eval=evals, fingerprint=rows.fingerprint, label_names=names)
