"""Issue 14 items 1 and 3: adapter names have owners; a user's job reads only what the read policy allows.

A real service process on the session stack (it admits nothing), the real MLflow registry and S3 audit log.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from svc_helpers import REPO, TINY_DATA, tiny_spec

from peftray.errors import ConfigError, ForbiddenError

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def lora_folder(tiny_model, tmp_path_factory):
    """A LoRA adapter of the tiny Llama in HF PEFT's format, saved by peftray's PeftModel."""
    from transformers import AutoModelForCausalLM

    from peftray import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(folder)
    return folder


def _refusals(name: str, stack) -> list[dict]:
    from peftray.registry import audit_log

    return [e for e in audit_log(name, None, stack) if e["action"] == "refused"]


def test_only_the_owner_or_an_admin_writes_an_adapter_name(queued_service, users, tiny_model, lora_folder, stack):
    from peftray.registry import list_versions, register_adapter

    name = "owned-" + uuid.uuid4().hex[:8]
    alice, bob, admin = users["alice"], users["bob"], users["admin"]
    register_adapter(lora_folder, name, owner="alice", config=stack)  # alice's job registers the name first
    # bob submits a job naming alice's adapter (on main it was queued, and then bob could move its aliases)
    with pytest.raises(ForbiddenError, match="belongs to 'alice'"):
        bob.submit(tiny_spec("takeover", tiny_model, registry={"model_name": name}))
    assert not [j for j in bob.list()["jobs"] if j["name"] == "takeover"]
    with pytest.raises(ForbiddenError, match="belongs to 'alice'"):
        bob.promote(name, 1, "production")
    with pytest.raises(ForbiddenError):
        bob.rollback(name, "production")
    # a job of bob's that reached the trainer anyway (submitted before alice's first version) is refused there
    with pytest.raises(ForbiddenError):
        register_adapter(lora_folder, name, owner="bob", job_name="bobs-job", config=stack)
    assert [v.version for v in list_versions(name, config=stack)] == [1]
    refused = _refusals(name, stack)
    assert {(e["actor"], e["alias"]) for e in refused} >= {("bob", "production"), ("bob", "_versions")}
    assert len(refused) == 4 and all("alice" in e["error"] for e in refused)
    assert alice.promote(name, 1, "staging")["version"] == 1  # the owner may
    assert admin.promote(name, 1, "production")["version"] == 1  # and so may an admin
    version = register_adapter(lora_folder, name, owner="carol", owner_is_admin=True, job_name="ops", config=stack)
    assert version.version == 2


def test_a_name_registered_outside_the_service_is_admin_only(queued_service, users, lora_folder, stack):
    from peftray.registry import register_adapter

    name = "operator-" + uuid.uuid4().hex[:8]
    register_adapter(lora_folder, name, config=stack)  # `peftray registry import`: no owner tag
    with pytest.raises(ForbiddenError, match="no owner"):
        users["alice"].promote(name, 1, "staging")
    assert users["admin"].promote(name, 1, "staging")["version"] == 1


def _refused(svc, token: str, spec: dict, field: str) -> str:
    r = httpx.post(f"{svc.url}/v1/jobs", json=spec, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 400, (spec, r.text)
    message = r.json()["error"]["message"]
    assert f"`{field}`" in message and "uploads/" in message and str(REPO / "jobs") in message, message
    return message


def test_read_policy_refuses_paths_outside_the_allowed_roots(queued_service, users, tiny_model, stack, tmp_path):
    alice, admin = users["alice"], users["admin"]
    token = alice.http.headers["Authorization"].removeprefix("Bearer ")
    before = len(admin.list(limit=500)["jobs"])
    link = tmp_path / "link.jsonl"  # inside an allowed root (the session's temp folder), pointing out of it
    link.symlink_to("/etc/passwd")
    sources = ["/etc/shadow", "../../etc/passwd", f"{REPO}/jobs/../../../etc/passwd", "file:///etc/passwd",
               str(stack.state_dir / "stack.json"), str(link), f"s3://{stack.bucket}/uploads/bob/data.jsonl",
               f"s3://{stack.bucket}/uploads/alice/../bob/data.jsonl", "https://example.com/x.jsonl"]
    for source in sources:
        _refused(queued_service, token, tiny_spec("reads", tiny_model, dataset={"source": source}), "dataset.source")
    for path in ("/etc", str(stack.state_dir)):
        _refused(queued_service, token, tiny_spec("reads", tiny_model, base_model={"path": path}), "base_model.path")
    assert len(admin.list(limit=500)["jobs"]) == before  # nothing was stored
    allowed = {f"s3://{stack.bucket}/uploads/alice/data.jsonl": None, "imdb": None, "org/some-data": None,
               str(TINY_DATA): str(TINY_DATA), f"file://{TINY_DATA}": str(TINY_DATA)}
    for source, pinned in allowed.items():
        checked = alice.submit(tiny_spec("reads", tiny_model, dataset={"source": source}), dry_run=True)
        assert checked["spec"]["dataset"]["source"] == (pinned or source)
    assert admin.submit(tiny_spec("reads", tiny_model, dataset={"source": "/etc/hosts"}), dry_run=True)["valid"]


def test_read_policy_file_adds_roots_per_user(stack, tiny_model, tmp_path):
    from svc_helpers import launch

    from peftray.service.client import ServiceClient

    team = tmp_path / "team-data"
    team.mkdir()
    (team / "rows.jsonl").write_text(TINY_DATA.read_text())
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"roots": [f"s3://{stack.bucket}/shared/"], "users": {"alice": [str(team)]}}))
    svc = launch(stack, tmp_path / "svc", max_running=0, read_policy=str(policy), read_roots=str(REPO / "jobs"))
    try:
        admin = ServiceClient(svc.url, svc.admin_token)
        alice = ServiceClient(svc.url, admin.create_token("alice"))
        bob = ServiceClient(svc.url, admin.create_token("bob"))
        for client in (alice, bob):
            spec = tiny_spec("shared", tiny_model, base_model={"path": "org/tiny"},
                             dataset={"source": f"s3://{stack.bucket}/shared/rows.jsonl"})
            assert client.submit(spec, dry_run=True)["valid"]
        spec = tiny_spec("team", tiny_model, base_model={"path": "org/tiny"}, dataset={"source": str(team / "rows.jsonl")})
        assert alice.submit(spec, dry_run=True)["valid"]
        with pytest.raises(ConfigError, match="`dataset.source`"):
            bob.submit(spec)
        with pytest.raises(ConfigError, match="`base_model.path`"):  # the tiny model's folder is no root here
            alice.submit(tiny_spec("team", tiny_model), dry_run=True)
    finally:
        svc.stop()
