"""`resolve`: `name@alias`, `name/3`, `name@latest` -> one immutable AdapterVersion."""

from __future__ import annotations

import re
from dataclasses import dataclass

from peftray.endpoints import Config
from peftray.errors import NotFoundError
from peftray.registry.client import get_config, mlflow_client, mlflow_errors
from peftray.registry.types import AdapterVersion

_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9._-]+))$")
REF_HELP = "Use name/<version>, name@<alias> or name@latest (e.g. my-adapter/3, my-adapter@production)."


@dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of version or alias is set (alias 'latest' = highest version)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version is not None else f"{self.name}@{self.alias}"


def parse_ref(ref: str) -> Ref:
    """Parse a reference string (an MLflow `models:/` prefix is accepted too)."""
    raw = str(ref).strip().removeprefix("models:/")
    m = _REF.match(raw)
    if not m:
        raise NotFoundError(f"{ref!r} is not an adapter reference. {REF_HELP}")
    if m.group("version") is not None:
        return Ref(m.group("name"), version=int(m.group("version")))
    return Ref(m.group("name"), alias=m.group("alias"))


def resolve(ref: str, config: Config | None = None) -> AdapterVersion:
    """Resolve a reference to one registered version (the version an alias points at right now).

    Args:
        ref: `name/3`, `name@production`, `name@latest`.
        config: endpoints; default `load_config()`.

    Raises:
        NotFoundError: a malformed reference, an unknown adapter, version or alias.
    """
    r = parse_ref(ref)
    client = mlflow_client(get_config(config))
    if r.version is not None:
        return get_version(client, r.name, r.version)
    if r.alias == "latest":
        return latest_version(client, r.name)
    try:
        with mlflow_errors(f"alias {r.alias!r} of adapter {r.name!r}"):
            mv = client.get_model_version_by_alias(r.name, r.alias)
    except NotFoundError:
        model = get_model(client, r.name)  # unknown name -> its own message
        known = ", ".join(sorted(model.aliases or {})) or "none"
        raise NotFoundError(f"adapter {r.name!r} has no alias {r.alias!r} (its aliases: {known}). "
                            f"Promote a version first: peftray registry promote {r.name} <version> {r.alias}") from None
    return AdapterVersion.from_model_version(mv)


def get_model(client, name: str):
    with mlflow_errors(f"adapter {name!r}", "List registered adapters with `peftray registry list`."):
        return client.get_registered_model(name)


def get_version(client, name: str, version: int) -> AdapterVersion:
    try:
        with mlflow_errors(f"version {version} of adapter {name!r}"):
            mv = client.get_model_version(name, str(version))
    except NotFoundError:
        get_model(client, name)
        raise NotFoundError(f"adapter {name!r} has no version {version}. "
                            f"See its versions with `peftray registry show {name}`.") from None
    return AdapterVersion.from_model_version(mv)


def latest_version(client, name: str) -> AdapterVersion:
    get_model(client, name)
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise NotFoundError(f"adapter {name!r} has no versions yet. Register one with `peftray registry import`.")
    newest = max(versions, key=lambda mv: int(mv.version))
    return get_version(client, name, int(newest.version))
