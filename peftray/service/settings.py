"""The control plane's own settings, read from environment variables (a plain process or a Ray Serve replica).

| variable | meaning | default |
|---|---|---|
| `PEFTRAY_SERVICE_DB_URL` | SQLAlchemy URL of the job store | `sqlite:///<state dir>/service.db` |
| `PEFTRAY_SERVICE_ADMIN_TOKEN` | the admin's bearer token | none: only per-user tokens work |
| `PEFTRAY_SERVICE_MAX_RUNNING` | jobs started (starting + running) at once, service-wide | 2 |
| `PEFTRAY_SERVICE_MAX_RUNNING_PER_USER` | the same, per owner | 2 |
| `PEFTRAY_SERVICE_MAX_BODY_BYTES` | largest request body accepted | 1 MiB |
| `PEFTRAY_SERVICE_POLL_S` | how often the scheduler asks Ray about jobs | 1.0 |
| `PEFTRAY_JOB_PYTHON` | python executable of the job driver on the cluster | this interpreter |
| `PEFTRAY_SERVICE_READ_ROOTS` | folders and s3:// prefixes every user's jobs may read (comma-separated) | none |
| `PEFTRAY_SERVICE_READ_POLICY` | YAML file `{roots: [...], users: {alice: [...]}}` (see `read_policy`) | none |
| `PEFTRAY_SERVICE_BASE_MODELS` | base models of the OpenAI fine-tuning API: `NAME=PATH_OR_URI,...` | none |
| `PEFTRAY_SERVICE_FT_ADAPTER` | JSON adapter section of OpenAI fine-tuning jobs | `{"method": "lora"}` |
| `PEFTRAY_SERVICE_MAX_ACTIVE_JOBS_PER_USER` | a user's jobs queued or running at once; beyond: 429 | 8 |
| `PEFTRAY_SERVICE_MAX_STORED_BYTES_PER_USER` | bytes of files (`POST /v1/files`) a user keeps; beyond: 429 | 1 GiB |
| `PEFTRAY_SERVICE_MAX_FILE_BYTES` | largest file upload | 64 MiB |

Endpoints and credentials of S3, MLflow and Ray come from `peftray.endpoints.load_config()` as everywhere else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from peftray.endpoints import Config, load_config
from peftray.errors import ConfigError
from peftray.service.read_policy import ReadPolicy


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    return value


@dataclass
class ServiceSettings:
    """Everything the service needs; `from_env()` builds it, tests build it directly."""

    config: Config
    db_url: str
    admin_token: str | None = None
    max_running: int = 2
    max_running_per_user: int = 2
    max_body_bytes: int = 1 << 20
    poll_s: float = 1.0
    job_python: str = field(default_factory=lambda: sys.executable)
    run_scheduler: bool = True
    read_policy: ReadPolicy | None = None  # None: users read only their upload prefix and hub ids
    base_models: dict[str, str] = field(default_factory=dict)  # OpenAI `model` name -> path, hub id or s3:// URI
    ft_adapter: dict[str, Any] = field(default_factory=lambda: {"method": "lora"})
    max_active_jobs_per_user: int = 8
    max_stored_bytes_per_user: int = 1 << 30
    max_file_bytes: int = 64 << 20
    # one-CPU-worker jobs run in this many warm runner processes (`peftray.service.warm_pool`); 0: every job
    # is a Ray job with Ray Train workers
    warm_runners: int = 2
    warm_idle_s: float = 600.0

    def policy(self) -> ReadPolicy:
        policy = self.read_policy or ReadPolicy(self.config.bucket, denied=_private_dirs(self.config, self.db_url))
        # the admin named these base models for everyone: any user's job may load them
        return dataclasses.replace(policy, base_models=tuple(self.base_models.values()))

    @classmethod
    def from_env(cls) -> "ServiceSettings":
        config = load_config()
        db_url = os.environ.get("PEFTRAY_SERVICE_DB_URL") or f"sqlite:///{config.state_dir / 'service.db'}"
        try:
            poll_s = float(os.environ.get("PEFTRAY_SERVICE_POLL_S") or 1.0)
        except ValueError:
            raw = os.environ["PEFTRAY_SERVICE_POLL_S"]
            raise ConfigError(f"PEFTRAY_SERVICE_POLL_S must be a number of seconds, got {raw!r}") from None
        return cls(
            config=config,
            db_url=db_url,
            admin_token=os.environ.get("PEFTRAY_SERVICE_ADMIN_TOKEN") or None,
            max_running=_int_env("PEFTRAY_SERVICE_MAX_RUNNING", 2),
            max_running_per_user=_int_env("PEFTRAY_SERVICE_MAX_RUNNING_PER_USER", 2),
            max_body_bytes=_int_env("PEFTRAY_SERVICE_MAX_BODY_BYTES", 1 << 20),
            poll_s=poll_s,
            job_python=os.environ.get("PEFTRAY_JOB_PYTHON") or sys.executable,
            read_policy=ReadPolicy.from_env(config.bucket, _private_dirs(config, db_url)),
            base_models=parse_base_models(os.environ.get("PEFTRAY_SERVICE_BASE_MODELS", "")),
            ft_adapter=_json_env("PEFTRAY_SERVICE_FT_ADAPTER", {"method": "lora"}),
            max_active_jobs_per_user=_int_env("PEFTRAY_SERVICE_MAX_ACTIVE_JOBS_PER_USER", 8),
            max_stored_bytes_per_user=_int_env("PEFTRAY_SERVICE_MAX_STORED_BYTES_PER_USER", 1 << 30),
            max_file_bytes=_int_env("PEFTRAY_SERVICE_MAX_FILE_BYTES", 64 << 20),
            warm_runners=_int_env("PEFTRAY_SERVICE_WARM_RUNNERS", 2),
            warm_idle_s=float(_int_env("PEFTRAY_SERVICE_WARM_IDLE_S", 600)),
        )


def parse_base_models(text: str) -> dict[str, str]:
    """`NAME=PATH_OR_URI,NAME2=...` (the form of `peftray service up --base-model`) as a mapping."""
    from peftray.registry.finetuned import PART

    out: dict[str, str] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, sep, where = item.partition("=")
        if not sep or not PART.match(name.strip()) or not where.strip():
            raise ConfigError(f"base model {item!r} must be NAME=PATH_OR_URI with NAME of letters, digits, '.', "
                              "'-', '_' (e.g. tiny-llama=/models/tiny-llama)")
        where = where.strip()
        out[name.strip()] = where if "://" in where or not os.path.exists(where) else os.path.realpath(where)
    return out


def _json_env(name: str, default: dict[str, Any]) -> dict[str, Any]:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a JSON object, got {raw!r}: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object (an adapter section), got {raw!r}")
    return value


def _private_dirs(config: Config, db_url: str) -> tuple[str, ...]:
    """Folders no user's job may read: the stack's state (its secrets) and a SQLite job store's folder."""
    dirs = [str(config.state_dir)]
    if db_url.startswith("sqlite:///"):
        dirs.append(os.path.dirname(os.path.abspath(db_url[len("sqlite:///"):])))
    return tuple(dirs)
