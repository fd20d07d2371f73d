"""`peftray service up|status|down` on the session stack, and the job CLI finding it through the state folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from svc_helpers import tiny_spec

from peftray.endpoints import load_config
from peftray.stack import procs

pytestmark = pytest.mark.stack


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PEFTRAY_SERVICE_URL", "PEFTRAY_TOKEN")}
    return subprocess.run([sys.executable, "-m", "peftray", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_service_up_status_down_and_job_cli(stack, tiny_model, tmp_path):
    from peftray.stack import control_plane

    up = _cli("service", "up", "--max-running", "0")
    assert up.returncode == 0, up.stderr
    svc = control_plane.status(stack.state_dir)
    try:
        cfg = load_config(stack.state_dir)
        assert cfg.service_url == svc.url and cfg.service_token == svc.admin_token
        assert svc.url.startswith("http://127.0.0.1:") and svc.proc.ports["service"] in procs.listening_ports(svc.proc)
        assert oct((stack.state_dir / control_plane.SERVICE_FILE).stat().st_mode & 0o777) == "0o600"
        assert _cli("service", "up").returncode == 0 and control_plane.status(stack.state_dir).proc.pid == svc.proc.pid
        assert _cli("service", "status").returncode == 0
        spec = tmp_path / "job.yaml"
        spec.write_text(yaml.safe_dump(tiny_spec("cli-job", tiny_model)))
        checked = _cli("submit", str(spec), "--dry-run")
        assert checked.returncode == 0 and "valid" in checked.stdout, checked.stderr
        bad = _cli("submit", str(spec), "training.max_steps=0")
        assert bad.returncode == 1 and "training.max_steps" in bad.stderr and "Traceback" not in bad.stderr
        sent = _cli("submit", str(spec), "--no-wait")
        assert sent.returncode == 0, sent.stderr
        job_id = sent.stdout.split()[2]
        listed = _cli("jobs", "list")
        assert listed.returncode == 0 and job_id in listed.stdout and "queued" in listed.stdout
        assert _cli("jobs", "cancel", job_id).returncode == 0
        shown = _cli("jobs", "show", job_id)
        assert shown.returncode == 0 and "cancelled" in shown.stdout
        missing = _cli("jobs", "show", "job-doesnotexist")
        assert missing.returncode == 1 and "does not exist" in missing.stderr
    finally:
        down = _cli("service", "down")
    assert down.returncode == 0 and procs.process_of(svc.proc) is None
    assert _cli("service", "status").returncode == 3
    assert load_config(stack.state_dir).service_url is None
