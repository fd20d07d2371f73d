"""What a job may read: the admin's read policy, checked at submission (400 naming the field and the roots).

A job's driver and workers read `dataset.source` and `base_model.path` with the cluster's credentials, so a
spec naming `/etc/shadow`, `../../x`, `file://...` or the stack's state folder would read it for its sender.
Non-admin users may read: their own upload prefix `s3://<bucket>/uploads/<user>/`, the roots the admin lists
for everyone (`PEFTRAY_SERVICE_READ_ROOTS`, comma-separated local folders and s3:// prefixes) or for them
(`PEFTRAY_SERVICE_READ_POLICY`, a YAML file `{roots: [...], users: {alice: [...]}}`), and hub ids. The
stack's state folder and the job store's folder are never readable, even under a root. Admins read anything.

A local path is checked after resolving symlinks and `..`, and the spec keeps that resolved absolute path, so
the worker reads exactly the file that was checked (a relative path would resolve in the worker's folder).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from peftray.errors import ConfigError
from peftray.jobspec import JobSpec

# `org/name` or `name`: what the hub accepts; anything else is a path
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class _PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    roots: list[str] = []
    users: dict[str, list[str]] = {}


@dataclass(frozen=True)
class ReadPolicy:
    """Roots (local folders, s3:// prefixes) for everyone and per user; folders nobody but an admin reads."""

    bucket: str
    roots: tuple[str, ...] = ()
    users: dict[str, tuple[str, ...]] = field(default_factory=dict)
    denied: tuple[str, ...] = ()
    base_models: tuple[str, ...] = ()  # base_model.path values the admin named for everyone (exact matches)

    @classmethod
    def from_env(cls, bucket: str, denied: tuple[str, ...]) -> "ReadPolicy":
        roots = [r.strip() for r in os.environ.get("PEFTRAY_SERVICE_READ_ROOTS", "").split(",") if r.strip()]
        users: dict[str, tuple[str, ...]] = {}
        path = os.environ.get("PEFTRAY_SERVICE_READ_POLICY")
        if path:
            try:
                parsed = _PolicyFile.model_validate(yaml.safe_load(Path(path).read_text()) or {})
            except (OSError, yaml.YAMLError, ValidationError) as exc:
                raise ConfigError(f"PEFTRAY_SERVICE_READ_POLICY {path}: not a readable policy "
                                  f"({{roots: [...], users: {{name: [...]}}}}): {exc}") from None
            roots += parsed.roots
            users = {u: tuple(r) for u, r in parsed.users.items()}
        for root in [*roots, *(r for rs in users.values() for r in rs)]:
            if not root.startswith("s3://") and not os.path.isabs(root):
                raise ConfigError(f"read root {root!r} must be an absolute folder or an s3:// prefix")
        return cls(bucket, tuple(roots), users, tuple(os.path.realpath(d) for d in denied))

    def allowed(self, user: str) -> list[str]:
        return [f"s3://{self.bucket}/uploads/{user}/", *self.roots, *self.users.get(user, ())]

    def check(self, spec: JobSpec, user: str) -> JobSpec:
        """The spec with its local paths resolved, or ConfigError naming the field and the allowed roots."""
        data = spec.dataset.source
        if spec.dataset.reads_file or not HUB_ID.match(data) or os.path.lexists(data):
            spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(
                update={"source": self._checked("dataset.source", data, user)})})
        if spec.dataset.eval_source:
            spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(
                update={"eval_source": self._checked("dataset.eval_source", spec.dataset.eval_source, user)})})
        base = spec.base_model.path
        if base in self.base_models:
            return spec
        if not HUB_ID.match(base) or os.path.lexists(base):
            spec = spec.model_copy(update={"base_model": spec.base_model.model_copy(
                update={"path": self._checked("base_model.path", base, user)})})
        return spec

    def _checked(self, field_name: str, value: str, user: str) -> str:
        if value.startswith("s3://"):
            parts = value[len("s3://"):].split("/")
            if "" not in parts[:-1] and ".." not in parts and "." not in parts and any(
                    value.rstrip("/") + "/" == r or value.startswith(r) for r in self._s3_roots(user)):
                return value
        elif "://" not in value.removeprefix("file://"):
            real = os.path.realpath(value.removeprefix("file://"))
            if not any(_under(real, d) for d in self.denied) and any(
                    _under(real, os.path.realpath(r)) for r in self.allowed(user) if not r.startswith("s3://")):
                return real
        raise ConfigError(
            f"`{field_name}` {value!r} is outside what user {user!r} may read. Allowed: "
            f"{', '.join(self.allowed(user))}, or a hub id (org/name). Upload the data to your prefix, or ask "
            "an admin to add a root (PEFTRAY_SERVICE_READ_ROOTS / PEFTRAY_SERVICE_READ_POLICY).")

    def _s3_roots(self, user: str) -> list[str]:
        return [r.rstrip("/") + "/" for r in self.allowed(user) if r.startswith("s3://")]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
