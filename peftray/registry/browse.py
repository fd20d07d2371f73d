"""Browsing the registry: adapters, their versions (with aliases and key metrics), and a diff of two versions."""

from __future__ import annotations

import json
from typing import Any

from peftray.endpoints import Config
from peftray.registry import types as t
from peftray.registry.client import get_config, mlflow_client
from peftray.registry.resolve import get_model, get_version
from peftray.registry.types import AdapterSummary, AdapterVersion


def list_adapters(config: Config | None = None) -> list[AdapterSummary]:
    """Every registered model that peftray registered as an adapter, sorted by name."""
    client = mlflow_client(get_config(config))
    models = client.search_registered_models(f"tags.`{t.TAG_IS_ADAPTER}` = 'true'", max_results=1000)
    out = []
    for m in models:
        latest = [int(v.version) for v in (m.latest_versions or [])]
        out.append(AdapterSummary(
            name=m.name, latest_version=max(latest) if latest else None,
            aliases={a: int(v) for a, v in (m.aliases or {}).items()}, description=m.description or None,
            updated_at_ms=m.last_updated_timestamp))
    return sorted(out, key=lambda s: s.name)


def list_versions(name: str, config: Config | None = None) -> list[AdapterVersion]:
    """All versions of adapter `name`, oldest first, each with the aliases that point at it now."""
    client = mlflow_client(get_config(config))
    model = get_model(client, name)
    by_version: dict[int, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(int(v), []).append(alias)
    found = client.search_model_versions(f"name='{name}'")
    return sorted((AdapterVersion.from_model_version(mv, by_version.get(int(mv.version), [])) for mv in found),
                  key=lambda av: av.version)


DIFF_FIELDS = ("base_model", "base_revision", "method", "rank", "target_modules", "job_name",
               "dataset_fingerprint", "content_sha256", "run_id")


def diff_versions(name: str, v1: int, v2: int, config: Config | None = None) -> dict[str, Any]:
    """Compare two versions: metrics (with v2 - v1), registry fields, adapter_config keys and files.

    Returns:
        {"name", "v1", "v2", "metrics": {metric: {"v1", "v2", "delta"}}, "fields": {field: {"v1", "v2"}},
         "config": {key: {"v1", "v2"}}, "files": {path: {"v1", "v2"}}}; each section lists differences only,
        except metrics, which lists every metric either version has.
    """
    client = mlflow_client(get_config(config))
    a, b = get_version(client, name, int(v1)), get_version(client, name, int(v2))
    metrics = {}
    for m in sorted(set(a.metrics) | set(b.metrics)):
        x, y = a.metrics.get(m), b.metrics.get(m)
        metrics[m] = {"v1": x, "v2": y, "delta": (y - x) if x is not None and y is not None else None}
    return {
        "name": name, "v1": a.version, "v2": b.version, "metrics": metrics,
        "fields": _changed({f: getattr(a, f) for f in DIFF_FIELDS}, {f: getattr(b, f) for f in DIFF_FIELDS}),
        "config": _changed(_config_of(a), _config_of(b)),
        "files": _changed(a.files, b.files),
    }


def _config_of(av: AdapterVersion) -> dict[str, Any]:
    raw = av.tags.get(t.TAG_ADAPTER_CONFIG)
    if raw:
        return json.loads(raw)
    from peftray.registry.fetch import fetch  # a config too big for a tag: read the file itself

    return json.loads((fetch(av) / "adapter_config.json").read_text())


def _changed(x: dict[str, Any], y: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: {"v1": x.get(k), "v2": y.get(k)} for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}
