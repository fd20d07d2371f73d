"""`promote`, `rollback`, `alias_state`: move an alias between versions, gated, audited, race-safe.

Order of a promotion: (1) read the alias's audit log and replay it to the current holder, (2) check the
gate against that holder, (3) append the entry with a conditional write (lose the race -> back to 1, so a
"no worse than current" gate always compares with the real predecessor), (4) make MLflow's alias follow the
log. Step 4 loops until the log's tail did not move while the alias was written, so when concurrent
promoters finish, the alias is the last entry's version: never a half-applied state. Artifacts are never
copied: an alias is a pointer.
"""

from __future__ import annotations

import getpass
import os
import random
import re
import socket
import time
from datetime import datetime, timezone
from typing import Any

from peftray.endpoints import Config
from peftray.errors import ConfigError, GateError, NotFoundError, PeftrayError
from peftray.registry.audit import PROMOTE, REFUSED, ROLLBACK, AuditLog, holders
from peftray.registry.client import get_config, mlflow_client, mlflow_errors
from peftray.registry.gates import check_base, check_gate
from peftray.registry.resolve import get_model, get_version
from peftray.registry.types import T, MetricGate

ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,99}$")
_MAX_TRIES = 50


def seq_tag(alias: str) -> str:
    """Registered-model tag holding the log sequence number the alias was last synced to (the change token)."""
    return f"{T}alias.{alias}.seq"


def promote(name: str, version: int, alias: str, *, gate: MetricGate | None = None, actor: str | None = None,
            reason: str | None = None, serving_base: str | None = None, config: Config | None = None) -> dict:
    """Point `name@alias` at `version`, after its gate passes; returns the audit record.

    Args:
        name: registered adapter name.
        version: the version to promote.
        alias: `staging`, `production` or any alias name.
        gate: optional metric gate (threshold and/or no worse than the current holder).
        actor: who promotes (default: the OS user); reason: why, free text. Both go to the audit log.
        serving_base: base model (`id` or `id@revision`) the alias serves; a version trained on another base
            is refused.
        config: endpoints; default `load_config()`.

    Raises:
        NotFoundError: unknown adapter or version. GateError: the gate or the base check refused (recorded).
    """
    cfg, client = _clients(config)
    _check_alias(alias)
    cand = get_version(client, name, int(version))
    log = AuditLog(cfg, name, alias)
    for _ in range(_MAX_TRIES):
        entries = log.entries()
        current = _current(client, name, alias, entries)
        entry = _entry(PROMOTE, name, alias, cand.version, current, entries, actor, reason)
        entry.update(gate=gate.to_dict() if gate else None, serving_base=serving_base)
        try:
            check_base(cand, alias, serving_base)
            holder = get_version(client, name, current) if current and gate and gate.no_worse_than_current else None
            entry["checks"] = check_gate(gate, cand, alias, holder)
        except GateError as exc:
            entry.update(action=REFUSED, error=str(exc))
            if log.append(entry):
                raise
            continue  # someone moved the alias meanwhile: judge again against the new holder
        if log.append(entry):
            _sync_alias(client, log, name, alias)
            return entry
        time.sleep(random.uniform(0.01, 0.1))
    raise PeftrayError(f"could not promote {name}/{version} to {alias!r}: {_MAX_TRIES} concurrent writers won first.")


def rollback(name: str, alias: str, *, actor: str | None = None, reason: str | None = None,
             config: Config | None = None) -> dict:
    """Move `name@alias` back to the version that held it before the current one; returns the audit record.

    Raises:
        NotFoundError: the alias has no earlier holder to go back to.
    """
    cfg, client = _clients(config)
    _check_alias(alias)
    get_model(client, name)
    log = AuditLog(cfg, name, alias)
    for _ in range(_MAX_TRIES):
        entries = log.entries()
        stack = holders(entries)
        if len(stack) < 2:
            raise NotFoundError(f"{name}@{alias} has no earlier holder to roll back to (its promotion history has "
                                f"{len(stack)} holder(s)). See `peftray registry show {name} --history`.")
        entry = _entry(ROLLBACK, name, alias, stack[-2], stack[-1], entries, actor, reason)
        if log.append(entry):
            _sync_alias(client, log, name, alias)
            return entry
        time.sleep(random.uniform(0.01, 0.1))
    raise PeftrayError(f"could not roll back {name}@{alias}: {_MAX_TRIES} concurrent writers won first.")


def alias_state(name: str, alias: str, config: Config | None = None) -> tuple[int | None, str]:
    """(version the alias points at or None, change token): one MLflow call, cheap enough to poll.

    The token changes on every promotion or rollback of the alias (even A -> B -> A), so a serving replica can
    compare it with the last token it saw and re-resolve only when it differs.
    """
    _, client = _clients(config)
    model = get_model(client, name)
    version = (model.aliases or {}).get(alias)
    seq = (model.tags or {}).get(seq_tag(alias), "0")
    return (int(version) if version is not None else None), f"{version or '-'}:{seq}"


def record_refusal(name: str, alias: str, *, actor: str, error: str, version: int | None = None,
                   config: Config | None = None) -> dict[str, Any]:
    """Append a `refused` entry (who tried what, and why not) to the audit log of `name@alias`."""
    cfg = get_config(config)
    log = AuditLog(cfg, name, alias)
    for _ in range(_MAX_TRIES):
        entries = log.entries()
        entry = _entry(REFUSED, name, alias, version or 0, None, entries, actor, None)
        entry["error"] = error
        if log.append(entry):
            return entry
        time.sleep(random.uniform(0.01, 0.1))
    raise PeftrayError(f"could not record the refusal on {name}@{alias}: {_MAX_TRIES} concurrent writers won first.")


def audit_log(name: str, alias: str | None = None, config: Config | None = None) -> list[dict[str, Any]]:
    """The promotion/rollback/refusal records of `name@alias` (every alias when None), oldest first."""
    cfg, _ = _clients(config)
    return AuditLog(cfg, name, alias).entries()


def _clients(config: Config | None):
    cfg = get_config(config)
    return cfg, mlflow_client(cfg)


def _check_alias(alias: str) -> None:
    if not isinstance(alias, str) or not ALIAS_RE.match(alias) or alias == "latest" or re.match(r"^v\d+$", alias):
        raise ConfigError(f"alias must be letters, digits, '_' or '-' starting with a letter (not 'latest' nor "
                          f"'v<number>', which MLflow reserves), got {alias!r}. Example: production.")


def _current(client, name: str, alias: str, entries: list[dict]) -> int | None:
    """The holder per the log; when the log is empty, whatever MLflow's alias says (set outside peftray)."""
    if entries:
        stack = holders(entries)
        return stack[-1] if stack else None
    held = (get_model(client, name).aliases or {}).get(alias)
    return int(held) if held is not None else None


def _entry(action: str, name: str, alias: str, version: int, current: int | None, entries: list[dict],
           actor: str | None, reason: str | None) -> dict[str, Any]:
    return {
        "seq": (entries[-1]["seq"] + 1) if entries else 1, "action": action, "name": name, "alias": alias,
        "version": int(version), "from_version": current, "actor": actor or _whoami(), "reason": reason,
        "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "host": socket.gethostname(), "pid": os.getpid(),
    }


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return os.environ.get("USER", "unknown")


def _sync_alias(client, log: AuditLog, name: str, alias: str) -> None:
    """Make MLflow's alias equal the log's holder; repeat until the log did not grow while we wrote it."""
    for _ in range(_MAX_TRIES):
        entries = log.entries()
        stack, seq = holders(entries), entries[-1]["seq"]
        with mlflow_errors(f"adapter {name!r}"):
            if stack:
                client.set_registered_model_alias(name, alias, str(stack[-1]))
            else:
                client.delete_registered_model_alias(name, alias)
            client.set_registered_model_tag(name, seq_tag(alias), str(seq))
        if log.last_seq() == seq:
            return
    raise PeftrayError(f"{name}@{alias} kept changing while it was being applied; run the promotion again.")
