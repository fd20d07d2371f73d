"""Fixtures of the control-plane tests: real service processes on the session stack, users and tiny specs."""

from __future__ import annotations

import pytest
from svc_helpers import launch

from peftray.service.client import ServiceClient


@pytest.fixture(scope="module")
def queued_service(stack, tmp_path_factory):
    """A service that admits nothing (max_running=0): every accepted job stays queued, Ray is never asked."""
    svc = launch(stack, tmp_path_factory.mktemp("svc-queued"), max_running=0)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def users(queued_service):
    """Admin, alice and bob clients of `queued_service`."""
    admin = ServiceClient(queued_service.url, queued_service.admin_token)
    alice = ServiceClient(queued_service.url, admin.create_token("alice"))
    bob = ServiceClient(queued_service.url, admin.create_token("bob"))
    yield {"admin": admin, "alice": alice, "bob": bob}
    for c in (admin, alice, bob):
        c.close()
