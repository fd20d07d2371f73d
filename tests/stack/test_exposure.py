"""What the running stack exposes: secrets only in their own 0600 files, private state, loopback-only ports.

One module fixture trains a tiny job through a real control-plane process and serves the adapter it made, so
every path that hands credentials on (service -> Ray job -> Ray Train workers, deploy -> Serve replicas) has
run before the files, command lines and Ray's job and actor records are searched for every secret value.
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from peftray import stack as local_stack
from peftray.service.client import ServiceClient
from peftray.stack.control_plane import start_service
from peftray.stack import procs
from peftray.stack.servers import ray_temp_dir

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
# The files whose job is to hold a credential (each must be 0600); every other file must hold none.
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")  # the last: IPv4 loopback on a dual-stack socket
CREDENTIAL_FILES = {"stack.json", "service.json", "ray_auth_token", "s3.json", "auth.ini"}
VOLUME_INFO_KEYS = {"files", "version", "replication", "bytesOffset", "datFileSize", "expireAtSec", "readOnly",
                    "ecShardConfig", "readOnlyCanDelete", "offsetSize", "dataFileSize", "createdAt"}


@pytest.fixture(scope="module")
def exercised(stack, ray_session, tiny_model, tmp_path_factory):
    """Train through a service process, then serve the adapter; yields what the searches need."""
    from peftray.serve import ServeConfig, deploy, down

    folder = tmp_path_factory.mktemp("svc-exposure")
    # alice's job reads the repo's example data and the session's tiny model: roots an admin granted
    roots = f"{REPO / 'jobs'},{Path(tiny_model).parent}"
    svc = start_service(folder, {"PEFTRAY_SERVICE_POLL_S": "0.3", "PEFTRAY_SERVICE_READ_ROOTS": roots},
                        state_dir=stack.state_dir)
    name = f"t{uuid.uuid4().hex[:8]}"
    serve_spec = ServeConfig(name=f"x{name}", base_model=str(tiny_model), num_cpus=0, torch_threads=1,
                             api_key="serve-key-" + uuid.uuid4().hex, request_timeout_s=60)
    try:
        admin = ServiceClient(svc.url, svc.admin_token)
        user_token = admin.create_token("alice")
        with ServiceClient(svc.url, user_token) as alice:
            job = alice.wait(alice.submit(_tiny_spec(name, tiny_model))["id"], timeout=900)  # generous: a busy 2-core machine
        assert job["state"] == "succeeded", job
        dep = deploy(serve_spec, wait_s=600)
        resp = httpx.post(dep.url + "/v1/completions", headers={"Authorization": f"Bearer {dep.api_key}"},
                          json={"model": f"{name}/1", "prompt": "hello", "max_tokens": 2}, timeout=300)
        assert resp.status_code == 200, resp.text  # the replica reached MLflow and S3 without env_vars
        secrets = {"S3 secret key": stack.aws_secret_access_key, "MLflow password": stack.mlflow_password,
                   "Ray token": stack.ray_auth_token, "service admin token": svc.admin_token,
                   "user token": user_token, "serve key": dep.api_key}
        yield {"secrets": secrets, "svc": svc, "folders": [stack.state_dir, folder, ray_temp_dir(stack.state_dir)]}
    finally:
        try:
            down(serve_spec.name)
        except Exception:  # noqa: BLE001 - the app may not have been deployed
            pass
        svc.stop()


def _tiny_spec(name: str, model: Path) -> dict:
    from peftray.jobspec import load_spec

    return load_spec(str(REPO / "jobs" / "tiny-lora-instruct.yaml"), [
        f"name={name}", f"base_model.path={model}", f"registry.model_name={name}", "registry.promote=null",
        "training.max_steps=2", "training.eval_every=null", "resources.num_workers=1",
        f"dataset.source={REPO / 'jobs' / 'data' / 'tiny_instruct.jsonl'}"]).model_dump(mode="json")


def _our_processes(stack, svc) -> list[psutil.Process]:
    roots = [*local_stack.status(stack.state_dir).procs.values(), svc.proc]
    found = []
    for root in roots:
        head = procs.process_of(root)
        found += procs.tree(head) if head else []
    return found


def _ray_records(stack) -> str:
    """Ray's job list (entrypoint, runtime_env, metadata), its actors and the Serve apps' config, as text."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    client = JobSubmissionClient(stack.ray_dashboard_url,
                                 headers={"Authorization": f"Bearer {stack.ray_auth_token}"})
    jobs = [j.dict() if hasattr(j, "dict") else vars(j) for j in client.list_jobs()]
    actors = [dict(a.__dict__) if hasattr(a, "__dict__") else a for a in list_actors(address=stack.ray_address, detail=True, limit=10000)]
    serve = httpx.get(f"{stack.ray_dashboard_url}/api/serve/applications/",
                      headers={"Authorization": f"Bearer {stack.ray_auth_token}"}, timeout=30).text
    return json.dumps({"jobs": jobs, "actors": actors}, default=str) + serve


def test_no_secret_outside_its_own_private_file(stack, exercised):
    secrets = exercised["secrets"]
    assert all(v and len(v) >= 16 for v in secrets.values()), "every secret is a real, long value"
    leaks = []
    for root in exercised["folders"]:
        for path in Path(root).rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found = [what for what, value in secrets.items() if value.encode() in data]
            private = path.name in CREDENTIAL_FILES and stat.S_IMODE(path.stat().st_mode) == 0o600
            if found and not private:
                leaks.append(f"{path}: {found}")
    for p in _our_processes(stack, exercised["svc"]):
        try:
            cmdline = "\0".join(p.cmdline())
        except psutil.Error:
            continue
        leaks += [f"command line of pid {p.pid}: {what}" for what, v in secrets.items() if v in cmdline]
    records = _ray_records(stack)
    leaks += [f"Ray job/actor/serve records: {what}" for what, v in secrets.items() if v in records]
    assert not leaks, "secret values outside their 0600 credential files:\n" + "\n".join(leaks)


def test_stack_status_json_prints_no_secret(stack, exercised, capsys):
    from peftray.cli import main

    code = main(["--state-dir", str(stack.state_dir), "stack", "status", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["running"] is True
    shown = [what for what, v in exercised["secrets"].items() if v in out]
    assert not shown, f"`stack status --json` printed {shown}"
    assert stack.mlflow_tracking_uri in out  # the endpoints are still there


def test_state_is_private_to_its_owner(stack, exercised):
    """Folders 0700 and files 0600 in the stack's and the service's state (job store + WAL, MLflow DBs, volumes)."""
    state, service = Path(exercised["folders"][0]), Path(exercised["folders"][1])
    must_exist = [state / "mlflow" / "mlflow.db", state / "mlflow" / "auth.db", service / "service.db"]
    assert all(p.exists() for p in must_exist), must_exist
    assert list((state / "weed" / "data").rglob("*.dat")), "SeaweedFS volume files"
    open_to_others = []
    for root in (state, service):
        for path in [root, *root.rglob("*")]:
            if path.is_symlink() or path.is_socket():
                continue
            if path.suffix == ".vif" and path.parent.name == "data":
                # SeaweedFS writes its volume-info files 0644 whatever the umask: format version and size only,
                # no data and no secret, inside its 0700 data folder (checked like every other folder here)
                assert set(json.loads(path.read_text())) <= VOLUME_INFO_KEYS, path.read_text()
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                open_to_others.append(f"{path} {oct(mode)}")
    assert not open_to_others, "state readable by other users:\n" + "\n".join(open_to_others)


def test_ray_and_serve_listen_on_loopback_only(stack, exercised):
    head = procs.process_of(local_stack.status(stack.state_dir).procs["ray"])
    listening = []
    for p in procs.tree(head):
        try:
            listening += [(p.pid, " ".join(p.cmdline())[:80], c.laddr) for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    assert listening, "the Ray head listens somewhere"
    public = [f"{pid} {cmd}: {addr.ip}:{addr.port}" for pid, cmd, addr in listening
              if addr.ip not in LOOPBACK]
    assert not public, "Ray ports open beyond loopback:\n" + "\n".join(public)
