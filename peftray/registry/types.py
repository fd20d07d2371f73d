"""The registry's values: an adapter version as peftray sees it, a gate, and how they map to MLflow tags.

MLflow stores everything peftray needs as model-version tags (one row per tag), so a version read back from
any MLflow client (UI, REST, another language) carries its base model, method, metrics and file digests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from peftray.errors import ConfigError
from peftray.jobspec.gate import MetricGate  # noqa: F401  (the one gate type; re-exported)

# Tag keys on a model version. `metric.<name>` holds one metric each, so the MLflow UI shows them as columns.
T = "peftray."
TAG_BASE_MODEL = T + "base_model"
TAG_BASE_REVISION = T + "base_revision"
TAG_METHOD = T + "method"
TAG_PEFT_TYPE = T + "peft_type"
TAG_TASK_TYPE = T + "task_type"
TAG_RANK = T + "rank"
TAG_TARGET_MODULES = T + "target_modules"
TAG_DATASET = T + "dataset_fingerprint"
TAG_JOB = T + "job_name"
TAG_FILES = T + "files"
TAG_SIZES = T + "file_sizes"
TAG_CONTENT = T + "content_sha256"
TAG_S3_URI = T + "s3_uri"
TAG_ADAPTER_CONFIG = T + "adapter_config"
METRIC_PREFIX = "metric."
# Tag on the registered model: marks the MLflow models that are peftray adapters (list_adapters filters on it).
TAG_IS_ADAPTER = T + "adapter"


@dataclass
class AdapterVersion:
    """One immutable registered adapter version.

    Attributes:
        name: registered model name.
        version: MLflow model version number.
        source: MLflow artifact URI of the adapter folder (`mlflow-artifacts:/...`).
        run_id: MLflow run that holds the artifacts.
        base_model: base model id/path from `adapter_config.json` (`base_model_name_or_path`) or as given.
        base_revision: base model revision, if known.
        method: `lora`, `dora`, `ia3`, `prompt_tuning`, `prefix_tuning`, `p_tuning` (or the `method` tag given).
        rank: LoRA rank `r`, None for methods without one.
        target_modules: adapted module names (as written in the adapter config).
        metrics: evaluation metrics recorded at registration.
        tags: every MLflow tag of the version (peftray's own are prefixed `peftray.` / `metric.`).
        aliases: aliases that point at this version now.
        files: relative path -> sha256 of every file of the adapter folder.
    """

    name: str
    version: int
    source: str
    run_id: str | None
    base_model: str | None
    base_revision: str | None
    method: str | None
    rank: int | None
    target_modules: list[str]
    metrics: dict[str, float]
    tags: dict[str, str]
    aliases: list[str]
    files: dict[str, str]
    job_name: str | None = None
    dataset_fingerprint: str | None = None
    content_sha256: str | None = None
    peft_type: str | None = None
    description: str | None = None
    created_at_ms: int | None = None

    @property
    def ref(self) -> str:
        """`name/version`: the immutable reference of this version."""
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_model_version(cls, mv: Any, aliases: list[str] | None = None) -> "AdapterVersion":
        """Build from an `mlflow.entities.model_registry.ModelVersion` (tags parsed back)."""
        tags = dict(mv.tags or {})
        rank = tags.get(TAG_RANK)
        return cls(
            name=mv.name, version=int(mv.version), source=mv.source, run_id=mv.run_id or None,
            base_model=tags.get(TAG_BASE_MODEL) or None, base_revision=tags.get(TAG_BASE_REVISION) or None,
            method=tags.get(TAG_METHOD) or None, rank=int(rank) if rank not in (None, "") else None,
            target_modules=_json(tags.get(TAG_TARGET_MODULES), []),
            metrics={k[len(METRIC_PREFIX):]: float(v) for k, v in tags.items() if k.startswith(METRIC_PREFIX)},
            tags=tags, aliases=sorted(aliases if aliases is not None else (getattr(mv, "aliases", None) or [])),
            files=_json(tags.get(TAG_FILES), {}), job_name=tags.get(TAG_JOB) or None,
            dataset_fingerprint=tags.get(TAG_DATASET) or None, content_sha256=tags.get(TAG_CONTENT) or None,
            peft_type=tags.get(TAG_PEFT_TYPE) or None, description=mv.description or None,
            created_at_ms=getattr(mv, "creation_timestamp", None),
        )


def _json(raw: str | None, default: Any) -> Any:
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default


@dataclass
class AdapterSummary:
    """One registered adapter (an MLflow registered model) for listings."""

    name: str
    latest_version: int | None
    aliases: dict[str, int] = field(default_factory=dict)
    description: str | None = None
    updated_at_ms: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


