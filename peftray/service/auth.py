"""Bearer-token authentication: an admin token from the settings, per-user tokens whose sha256 the store keeps.

Tokens are random 32-byte strings, so one unsalted sha256 is enough to make a leaked database useless for
logging in (there is nothing to brute-force); comparison of the admin token is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from peftray.errors import AuthError, ConfigError, ForbiddenError
from peftray.service.store import ADMIN_USER, JobRecord, JobStore

USER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    user: str
    is_admin: bool = False

    def check_owns(self, job: JobRecord) -> None:
        """Raise ForbiddenError unless this caller may see and change `job`."""
        if not self.is_admin and job.owner != self.user:
            raise ForbiddenError(f"job {job.id} belongs to another user; your token ({self.user}) may only "
                                 "see and cancel its own jobs")

    def check_admin(self, action: str) -> None:
        if not self.is_admin:
            raise ForbiddenError(f"{action} needs the admin token; user {self.user!r} may not do it")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "ptk_" + secrets.token_urlsafe(32)


def authenticate(header: str | None, store: JobStore, admin_token: str | None) -> Principal:
    """The caller named by an `Authorization: Bearer <token>` header.

    Raises:
        AuthError: no header, not a bearer token, or a token nobody holds.
    """
    if not header:
        raise AuthError("missing API token: send `Authorization: Bearer <token>` "
                        "(the CLI reads it from PEFTRAY_TOKEN)")
    # RFC 9110: the scheme is case-insensitive (`bearer`, `BEARER`); the token itself is matched exactly
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("the Authorization header must be `Bearer <token>`")
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal(ADMIN_USER, is_admin=True)
    row = store.token_row(token_hash(token))  # read on every request: a revocation holds from the next one
    if row is None:
        raise AuthError("unknown API token: check PEFTRAY_TOKEN, or ask an admin for a token "
                        "(`peftray service token USER`)")
    if row.revoked_at is not None:
        raise AuthError(f"API token {row.token_id} was revoked; ask an admin for a new one")
    if row.expires_at is not None and row.expires_at <= time.time():
        raise AuthError(f"API token {row.token_id} expired; ask an admin for a new one "
                        "(`peftray service token USER --ttl 30d`)")
    return Principal(row.user, is_admin=bool(row.is_admin))


def issue_token(store: JobStore, user: str, is_admin: bool = False, ttl_s: float | None = None) -> dict[str, Any]:
    """Create a token for `user`, store its hash; returns its record with the token (shown once, never stored).

    Args:
        ttl_s: seconds until it expires; None = never.
    """
    if not USER_NAME.match(user) or user == ADMIN_USER:
        raise ConfigError(f"`user` must be a lowercase name (letters, digits, '.', '-', '_'; not 'admin'), "
                          f"got {user!r}")
    if ttl_s is not None and not ttl_s > 0:
        raise ConfigError(f"`ttl_s` must be a positive number of seconds, got {ttl_s!r}")
    token = new_token()
    expires = time.time() + ttl_s if ttl_s is not None else None
    record = store.add_token(user, token_hash(token), is_admin=is_admin, expires_at=expires)
    return {**record, "token": token}
