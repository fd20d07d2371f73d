"""Bearer-token authentication: an admin token from the settings, per-user tokens whose sha256 the store keeps.

Tokens are random 32-byte strings, so one unsalted sha256 is enough to make a leaked database useless for
logging in (there is nothing to brute-force); comparison of the admin token is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from peftray.errors import AuthError, ConfigError, ForbiddenError
from peftray.service.store import JobRecord, JobStore

ADMIN_USER = "admin"
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
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("the Authorization header must be `Bearer <token>`")
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal(ADMIN_USER, is_admin=True)
    found = store.token_owner(token_hash(token))
    if found is None:
        raise AuthError("unknown API token: check PEFTRAY_TOKEN, or ask an admin for a token "
                        "(`peftray service token USER`)")
    return Principal(found[0], is_admin=found[1])


def issue_token(store: JobStore, user: str, is_admin: bool = False) -> str:
    """Create a token for `user`, store its hash, and return the token (shown once, never stored)."""
    if not USER_NAME.match(user) or user == ADMIN_USER:
        raise ConfigError(f"`user` must be a lowercase name (letters, digits, '.', '-', '_'; not 'admin'), "
                          f"got {user!r}")
    token = new_token()
    store.add_token(user, token_hash(token), is_admin=is_admin)
    return token
