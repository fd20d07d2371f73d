"""Issue 14 item 4: API tokens expire, are listed and revoked (REST and CLI); the auth scheme is case-insensitive.

A real service process on the session stack (it admits nothing: no job here needs Ray).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from peftray.errors import AuthError, NotFoundError
from peftray.service.client import ServiceClient

pytestmark = pytest.mark.stack


def _until_refused(client: ServiceClient, deadline_s: float = 60) -> str:
    """Call whoami until the service refuses the token; returns the refusal message."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            client.request("GET", "/v1/whoami")
        except AuthError as exc:
            return str(exc)
        assert time.monotonic() < deadline, "the token was still accepted"
        time.sleep(0.2)


def test_tokens_expire_list_and_revoke_over_rest(queued_service, users):
    admin, alice = users["admin"], users["alice"]
    record = admin.issue_token("dave", ttl_s=3600)
    assert record["token"].startswith("ptk_") and record["expires_at"] and record["active"]
    dave = ServiceClient(queued_service.url, record["token"])
    assert dave.request("GET", "/v1/whoami")["user"] == "dave"
    listed = {t["id"]: t for t in admin.list_tokens()}
    assert record["id"] in listed and "token" not in listed[record["id"]]
    assert {t["user"] for t in alice.list_tokens()} == {"alice"}  # a user lists only their own
    with pytest.raises(NotFoundError):
        alice.revoke_token(record["id"])  # nor revokes anyone else's
    assert dave.request("GET", "/v1/whoami")["user"] == "dave"
    revoked = dave.revoke_token(record["id"])  # a user may revoke their own token (a leaked one, say)
    assert revoked["revoked_at"] and not revoked["active"]
    with pytest.raises(AuthError, match="revoked"):
        dave.request("GET", "/v1/whoami")  # the very next request
    short = ServiceClient(queued_service.url, admin.create_token("erin", ttl_s=1))
    assert "expired" in _until_refused(short)
    states = {t["id"]: t["active"] for t in admin.list_tokens(user="erin")}
    assert list(states.values()) == [False]


def test_scheme_is_case_insensitive_and_the_token_is_not(queued_service, users):
    token = users["admin"].create_token("frank")
    for header in (f"Bearer {token}", f"bearer {token}", f"BEARER {token}", f"bEaReR   {token}"):
        r = httpx.get(f"{queued_service.url}/v1/whoami", headers={"Authorization": header})
        assert r.status_code == 200 and r.json()["user"] == "frank", header
    for header in (f"Bearer {token.upper()}", f"Bearer {token.swapcase()}", f"Basic {token}"):
        assert httpx.get(f"{queued_service.url}/v1/whoami", headers={"Authorization": header}).status_code == 401


def test_token_cli_ttl_list_revoke(queued_service, users):
    env = {**os.environ, "PEFTRAY_SERVICE_URL": queued_service.url, "PEFTRAY_TOKEN": queued_service.admin_token}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "peftray", "service", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    made = cli("token", "gina", "--ttl", "12h")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    gina = ServiceClient(queued_service.url, token)
    (record,) = gina.list_tokens()
    assert record["expires_at"] and record["active"]
    listed = cli("tokens", "--user", "gina")
    assert listed.returncode == 0 and record["id"] in listed.stdout and "active" in listed.stdout
    assert token not in listed.stdout
    gone = cli("revoke", record["id"])
    assert gone.returncode == 0 and "revoked" in gone.stdout
    with pytest.raises(AuthError, match="revoked"):
        gina.list_tokens()
    bad = cli("token", "gina", "--ttl", "soon")
    assert bad.returncode != 0 and "--ttl" in bad.stderr and "Traceback" not in bad.stderr
