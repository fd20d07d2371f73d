"""The adapter registry: MLflow model registry as the source of truth, S3 holding the bytes.

    register_adapter(folder, name, ...) -> AdapterVersion    resolve("name@production") -> AdapterVersion
    fetch("name/3") -> Path (verified local copy)           promote(name, 3, "production", gate=MetricGate(...))
    rollback(name, "production")                            alias_state(name, "production") -> (3, token)
    list_adapters(), list_versions(name), diff_versions(name, 2, 3), audit_log(name, alias)

Importing this package contacts no server; every function takes an optional `config` (default `load_config()`).
"""

from __future__ import annotations

from peftray.registry.browse import diff_versions, list_adapters, list_versions
from peftray.registry.fetch import fetch
from peftray.registry.finetuned import resolve_fine_tuned
from peftray.registry.promote import alias_state, audit_log, promote, rollback
from peftray.registry.register import register_adapter
from peftray.registry.resolve import parse_ref, resolve
from peftray.registry.types import AdapterSummary, AdapterVersion, MetricGate

__all__ = [
    "AdapterSummary", "AdapterVersion", "MetricGate", "alias_state", "audit_log", "diff_versions", "fetch",
    "list_adapters", "list_versions", "parse_ref", "promote", "register_adapter", "resolve", "resolve_fine_tuned",
    "rollback",
]
