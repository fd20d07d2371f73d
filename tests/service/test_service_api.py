"""The REST API of a real service process: auth, input validation, idempotency, streaming, load.

The service here admits nothing (max_running=0), so every accepted job stays queued and these tests need no
training; the lifecycle of real jobs on Ray is in test_service_lifecycle.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from svc_helpers import tiny_spec
from peftray.errors import AuthError, ConfigError, ForbiddenError

pytestmark = pytest.mark.stack


def _total_jobs(admin) -> int:
    n, cursor = 0, None
    while True:
        page = admin.list(limit=500, cursor=cursor)
        n += len(page["jobs"])
        cursor = page["next_cursor"]
        if cursor is None:
            return n


def test_openapi_is_served(queued_service):
    schema = httpx.get(f"{queued_service.url}/openapi.json").json()
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/logs",
                 "/v1/jobs/{job_id}/cancel", "/v1/adapters", "/v1/adapters/{name}/promote"):
        assert path in schema["paths"], path


def test_auth_errors_are_json_and_change_nothing(queued_service, users, tiny_model):
    url = queued_service.url
    job = users["bob"].submit(tiny_spec("auth-bob", tiny_model))
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic abc"}):
        for method, path in (("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job['id']}"),
                             ("POST", f"/v1/jobs/{job['id']}/cancel"), ("POST", "/v1/jobs")):
            r = httpx.request(method, url + path, headers=headers, content=b"name: x")
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    alice = users["alice"]
    with pytest.raises(ForbiddenError, match="another user"):
        alice.get(job["id"])
    with pytest.raises(ForbiddenError):
        alice.cancel(job["id"])
    with pytest.raises(ForbiddenError):
        list(alice.events(job["id"]))
    with pytest.raises(ForbiddenError):
        alice.create_token("mallory")
    with pytest.raises(AuthError):
        type(alice)(url, "ptk_" + "x" * 43).list()
    assert job["id"] not in [j["id"] for j in alice.list()["jobs"]]  # users list only their own jobs
    after = users["bob"].get(job["id"])
    assert after["state"] == "queued" and after["transitions"] == job["transitions"]
    assert job["id"] in [j["id"] for j in users["admin"].list()["jobs"]]  # the admin sees everyone's


BAD_INPUTS = [
    ("malformed YAML", "name: x\nbase_model: [unclosed\n", "application/yaml", 400, "not valid YAML"),
    ("unknown field", None, None, 400, "`trainig`"),
    ("path traversal name", {"name": "../../etc/passwd"}, None, 400, "`name`"),
    ("runtime_env", {"runtime_env": {"pip": ["evil"]}}, None, 400, "`runtime_env`"),
    ("nested command", {"training": {"command": "rm -rf /"}}, None, 400, "`training.command`"),
    ("entrypoint", {"entrypoint": "python evil.py"}, None, 400, "`entrypoint`"),
    ("oversized body", "x" * (2 << 20), "application/yaml", 413, "limit"),
    ("not a mapping", "[1, 2]", "application/yaml", 400, "mapping"),
    ("YAML alias bomb", "a: &a [1, 1]\nb: [*a, *a]\n", "application/yaml", 400, "alias"),
    # non-finite floats (Python's json writes Infinity/NaN, which its parser, and so the service's, accepts)
    ("infinite learning rate", {"training": {"max_steps": 4, "learning_rate": float("inf")}}, None, 400,
     "`training.learning_rate`"),
    ("NaN lora_alpha", {"adapter": {"method": "lora", "lora_alpha": float("nan")}}, None, 400, "`adapter.lora_alpha`"),
    ("YAML .inf", "name: x\nbase_model: m\ndataset: {source: d.jsonl, format: text}\ntraining: {learning_rate: .inf}\n",
     "application/yaml", 400, "`training.learning_rate`"),
    ("deep JSON", '{"a":' * 5000 + "1" + "}" * 5000, "application/json", 400, "nested more than"),
    ("deep YAML", "a: " + "[" * 5000 + "]" * 5000 + "\n", "application/yaml", 400, "nested more than"),
]


@pytest.mark.parametrize("label,change,ctype,status,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected_and_nothing_is_queued(queued_service, users, tiny_model, label, change, ctype,
                                                    status, needle):
    admin = users["admin"]
    before = _total_jobs(admin)
    spec = tiny_spec("bad-input", tiny_model)
    if change is None:
        spec["trainig"] = {"max_steps": 1}  # a typo of `training`
    if isinstance(change, dict):
        spec.update(change)
    body = change if isinstance(change, str) else json.dumps(spec)
    r = httpx.post(f"{queued_service.url}/v1/jobs", content=body.encode(),
                   headers={"Authorization": f"Bearer {queued_service.admin_token}",
                            "Content-Type": ctype or "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert _total_jobs(admin) == before


def test_yaml_body_idempotency_and_dry_run(users, tiny_model):
    alice = users["alice"]
    text = yaml.safe_dump(tiny_spec("yaml-body", tiny_model))
    checked = alice.submit(text, dry_run=True)
    assert checked["valid"] and checked["spec"]["name"] == "yaml-body"
    key = uuid.uuid4().hex
    first = alice.submit(text, idempotency_key=key)
    again = alice.submit(text, idempotency_key=key)
    assert first["id"] == again["id"] and first["owner"] == "alice" and first["state"] == "queued"
    with pytest.raises(Exception, match="different spec"):
        alice.submit(tiny_spec("yaml-body-2", tiny_model), idempotency_key=key)
    with pytest.raises(ConfigError, match="max_steps"):
        alice.submit(tiny_spec("yaml-body", tiny_model, training={"max_steps": 0}))


def test_events_follow_ends_when_a_queued_job_is_cancelled(users, tiny_model):
    alice = users["alice"]
    job = alice.submit(tiny_spec("follow-cancel", tiny_model))
    seen: list[dict] = []
    reader = threading.Thread(target=lambda: seen.extend(alice.events(job["id"], follow=True)))
    reader.start()
    time.sleep(1.0)
    assert reader.is_alive()  # following a queued job waits
    cancelled = alice.cancel(job["id"])
    reader.join(timeout=15)
    assert not reader.is_alive()
    assert cancelled["state"] == "cancelled" and cancelled["finished_at"]
    assert [e["state"] for e in seen] == ["queued", "cancelled"]
    assert "".join(alice.logs(job["id"], follow=True)) == ""  # never reached Ray: no logs, and no hang
    assert alice.cancel(job["id"])["state"] == "cancelled"  # cancelling twice is harmless


def test_load_200_submissions_from_8_clients(queued_service, users, tiny_model):
    """Every accepted job recorded exactly once, retries deduplicated, the limit (0) holds, the API answers."""
    tokens = [users["admin"].create_token(f"load{i}") for i in range(8)]
    latencies: list[float] = []
    accepted: dict[str, str] = {}
    lock = threading.Lock()

    def client_work(i: int) -> None:
        with httpx.Client(base_url=queued_service.url, headers={"Authorization": f"Bearer {tokens[i]}"},
                          timeout=60) as http:
            for n in range(25):
                key = f"c{i}-{n}"
                spec = tiny_spec(f"load-{i}-{n}", tiny_model)
                for attempt in range(2 if n % 5 == 0 else 1):  # every 5th POST is retried with the same key
                    t0 = time.perf_counter()
                    r = http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                    assert r.status_code == (201 if attempt == 0 else 200), r.text
                    with lock:
                        assert accepted.setdefault(key, r.json()["id"]) == r.json()["id"]
                t0 = time.perf_counter()
                assert http.get("/v1/jobs", params={"limit": 20}).status_code == 200
                with lock:
                    latencies.append(time.perf_counter() - t0)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client_work, range(8)))
    assert len(accepted) == 200 and len(set(accepted.values())) == 200
    admin = users["admin"]
    load_jobs = [j for j in admin.list(limit=500)["jobs"] if j["owner"].startswith("load")]
    assert sorted(j["id"] for j in load_jobs) == sorted(accepted.values())  # recorded exactly once
    assert {j["state"] for j in load_jobs} == {"queued"}  # max_running=0: nothing was started
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    assert p99 < 5.0, f"p99 {p99:.2f}s"
    with ThreadPoolExecutor(8) as pool:
        states = list(pool.map(lambda j: admin.cancel(j["id"])["state"], load_jobs))
    assert set(states) == {"cancelled"}


def test_oversized_body_without_length_is_refused(queued_service, users):
    before = _total_jobs(users["admin"])
    chunks = (b"# padding\n" * 6554 for _ in range(20))  # ~1.3 MB, sent chunked (no Content-Length)
    r = httpx.post(f"{queued_service.url}/v1/jobs", content=chunks, timeout=30,
                   headers={"Authorization": f"Bearer {queued_service.admin_token}"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert _total_jobs(users["admin"]) == before


def test_whoami_names_the_caller(users):
    assert users["alice"].request("GET", "/v1/whoami") == {"user": "alice", "is_admin": False}
    assert users["bob"].request("GET", "/v1/whoami") == {"user": "bob", "is_admin": False}
    assert users["admin"].request("GET", "/v1/whoami")["is_admin"] is True


def _cli(svc, token: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PEFTRAY_SERVICE_URL": svc.url, "PEFTRAY_TOKEN": token}
    return subprocess.Popen([sys.executable, "-m", "peftray", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_cli_follows_until_cancel_submit_exits_3_and_events_resume_after(queued_service, users, tiny_model,
                                                                         tmp_path):
    """`peftray submit` (following), `jobs events -f` and `jobs logs -f` all wait on a queued job and end when it is
    cancelled; submit exits with 3; `?after=SEQ` resumes the event stream after SEQ."""
    alice = users["alice"]
    token = alice.http.headers["authorization"].split()[1]
    name = f"cli-cancel-{uuid.uuid4().hex[:6]}"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(tiny_spec(name, tiny_model)))
    submit = _cli(queued_service, token, "submit", str(tmp_path / "job.yaml"))
    assert submit.stdout.readline().startswith("submitted job ")  # then it follows the queued job
    job_id = alice.list(name=name)["jobs"][0]["id"]
    events = _cli(queued_service, token, "jobs", "events", "-f", job_id)
    first = json.loads(events.stdout.readline())  # streamed while the job waits in the queue
    assert first["state"] == "queued"
    logs = _cli(queued_service, token, "jobs", "logs", "-f", job_id)
    alice.cancel(job_id)
    outs = {k: p.communicate(timeout=120)[0] for k, p in (("submit", submit), ("events", events), ("logs", logs))}
    assert submit.returncode == 3, outs["submit"]
    assert "cancelled" in outs["submit"]
    assert events.returncode == 0 and logs.returncode == 0, outs
    rest = [json.loads(line) for line in outs["events"].splitlines() if line.strip()]
    assert [e["state"] for e in [first, *rest]] == ["queued", "cancelled"]
    assert outs["logs"] == ""  # never reached Ray
    after = list(alice.events(job_id, after=first["seq"]))
    assert [e["seq"] for e in after] == [e["seq"] for e in rest] and all(e["seq"] > first["seq"] for e in after)
    assert list(alice.events(job_id, after=rest[-1]["seq"])) == []


def test_rest_promote_and_rollback_move_the_alias_and_only_for_the_owner(stack, users, tiny_model, tmp_path):
    """Admin promotes v1 then v2 over REST; rollback moves the alias back to v1; a user who owns nothing is refused."""
    import peftray
    from peftray import registry
    import torch
    from transformers import AutoModelForCausalLM

    name = f"rb-{uuid.uuid4().hex[:8]}"
    versions = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        cfg = peftray.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], init_lora_weights=False)
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        peftray.get_peft_model(base, cfg).save_pretrained(tmp_path / str(seed))
        versions.append(registry.register_adapter(tmp_path / str(seed), name, config=stack).version)
    v1, v2 = versions
    admin = users["admin"]
    admin.promote(name, v1, "production", reason="first")
    admin.promote(name, v2, "production", reason="second")
    assert registry.resolve(f"{name}@production", stack).version == v2
    with pytest.raises(ForbiddenError):
        users["bob"].rollback(name, "production", reason="not mine")
    assert registry.resolve(f"{name}@production", stack).version == v2
    admin.rollback(name, "production", reason="regression")
    assert registry.resolve(f"{name}@production", stack).version == v1
    last = registry.audit_log(name, "production", stack)[-1]
    assert (last["action"], last["version"], last["reason"]) == ("rollback", v1, "regression")
