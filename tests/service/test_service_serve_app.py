"""The control plane as a Ray Serve application on the session's Ray cluster: same API, same job store."""

from __future__ import annotations

import time

import httpx
import pytest
from svc_helpers import tiny_spec

from peftray.service.client import ServiceClient
from peftray.service.settings import ServiceSettings

pytestmark = pytest.mark.stack


def test_control_plane_runs_as_a_serve_app(stack, ray_session, tiny_model, tmp_path):
    from ray import serve

    from peftray.serve.lifecycle import serve_port
    from peftray.service.serve_app import build
    from peftray.service.store import JobStore

    db_url = f"sqlite:///{tmp_path / 'serve-jobs.db'}"
    settings = ServiceSettings(config=stack, db_url=db_url, admin_token="serve-admin-token", max_running=0)
    port = serve_port()
    serve.run(build(settings), name="peftray-control-plane-test", route_prefix="/control", blocking=False)
    try:
        url = f"http://127.0.0.1:{port}/control"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert httpx.get(f"{url}/v1/jobs").status_code == 401
        with ServiceClient(url, "serve-admin-token") as admin:
            job = admin.submit(tiny_spec("serve-app-job", tiny_model))
            assert admin.get(job["id"])["state"] == "queued"
        # the replica wrote to the same store a plain-process service would open
        assert JobStore(db_url).get(job["id"]).owner == "admin"
    finally:
        serve.delete("peftray-control-plane-test")
