"""One exception hierarchy for peftray.

Every error a user can cause says what was wrong, the value received and how to fix it. The CLI prints
`str(error)` (no traceback); the service returns it as JSON with `error.code` as the machine-readable kind.
"""

from __future__ import annotations


class PeftrayError(Exception):
    """Base class of every error peftray raises on purpose."""

    code = "peftray_error"
    http_status = 500


class ConfigError(PeftrayError, ValueError):
    """Bad user input: a job spec, an adapter config, a CLI flag, a config file."""

    code = "invalid_config"
    http_status = 400


class AdapterFormatError(PeftrayError, ValueError):
    """An adapter folder or file that is missing, truncated, pickled or does not fit the base model."""

    code = "invalid_adapter"
    http_status = 400


class NotFoundError(PeftrayError, LookupError):
    """A named thing (model, version, alias, job) does not exist."""

    code = "not_found"
    http_status = 404


class IntegrityError(PeftrayError):
    """Bytes that do not match their recorded sha256."""

    code = "integrity_error"
    http_status = 502


class GateError(PeftrayError):
    """A promotion refused by its metric gate."""

    code = "gate_failed"
    http_status = 409


class StackError(PeftrayError, RuntimeError):
    """The local stack could not be started, checked or stopped."""

    code = "stack_error"


class NonFiniteError(PeftrayError, RuntimeError):
    """Training produced a NaN or infinite loss or gradient: the job stops as failed and registers nothing."""

    code = "non_finite"


class AuthError(PeftrayError):
    """A missing, malformed or unknown API token."""

    code = "unauthorized"
    http_status = 401


class ForbiddenError(PeftrayError):
    """A valid token that may not do this (another user's job, an admin-only action)."""

    code = "forbidden"
    http_status = 403


class ConflictError(PeftrayError):
    """A request that clashes with the current state (a reused idempotency key, cancelling a finished job)."""

    code = "conflict"
    http_status = 409


class QuotaError(PeftrayError):
    """A request over one of the caller's quotas (jobs running at once, bytes stored); says which limit."""

    code = "quota_exceeded"
    http_status = 429
