"""The Serve application through HTTP with the real `openai` client: adapters, promotion, LRU, streaming, chat,
bad input. One deployment for the module (tests/serve/conftest.py)."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import openai
import pytest
import torch

from serve_helpers import MAX_NEW, PROMPT, hf_generate

pytestmark = pytest.mark.slow


def _client(dep, key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=dep.url + "/v1", api_key=key or dep.api_key, max_retries=0, timeout=60)


def _complete(client, model: str, prompt: str = PROMPT, **kw) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0, **kw)
    return out.choices[0].text


def test_adapters_answer_as_hf_peft_and_differently(served):
    dep, info = served
    client = _client(dep)
    n0, n1, n2 = info["names"]
    got = {0: _complete(client, f"{n0}/1"), 1: _complete(client, f"{n1}@production"),
           "base": _complete(client, info["spec"].served_model_id)}
    assert got == {k: info["answers"][k] for k in got}
    assert len(set(got.values())) == 3
    out = client.completions.create(model=f"{n1}/1", prompt=PROMPT, max_tokens=MAX_NEW, temperature=0)
    assert out.usage.prompt_tokens == len(info["ids"]) and out.usage.completion_tokens <= MAX_NEW
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    models = {m.id: m for m in client.models.list().data}
    assert info["spec"].served_model_id in models and f"{n0}@production" in models
    assert models[f"{n0}@production"].model_dump()["parent"] == info["spec"].served_model_id


def test_concurrent_mixed_requests_equal_single_requests(served):
    dep, info = served
    client = _client(dep)
    n0, n1, _ = info["names"]
    # exactly the deployment's capacity (max_ongoing + max_queued, one replica):
    # everything is served, nothing refused (Serve's own queue limit over-refuses such bursts; see OpenAIIngress.run)
    capacity = info["spec"].max_ongoing_requests + info["spec"].max_queued_requests
    jobs = ([(f"{n0}/1", 0), (f"{n1}/1", 1), (info["spec"].served_model_id, "base")] * capacity)[:capacity]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda j: _complete(client, j[0]), jobs))
    assert texts == [info["answers"][k] for _, k in jobs]


def test_promotion_and_rollback_reach_serving(served):
    """A moved alias changes the served answers without a redeploy. How soon (about alias_poll_s) is a latency,
    which belongs in a benchmark; here the deadline is generous so that a busy machine cannot fail the test."""
    from peftray.registry import promote, rollback

    dep, info = served
    client = _client(dep)
    name = info["names"][0]
    assert _complete(client, f"{name}@production") == info["answers"][0]
    for action, want in ((lambda: promote(name, 2, "production"), 1), (lambda: rollback(name, "production"), 0)):
        action()
        deadline = time.monotonic() + 120
        while (got := _complete(client, f"{name}@production")) != info["answers"][want]:
            assert got == info["answers"][1 - want], got  # the old holder's answer until the switch, nothing else
            assert time.monotonic() < deadline, "the alias move never reached serving"
            time.sleep(0.2)
        assert _complete(client, f"{name}/1") == info["answers"][0]  # a pinned version never moves


def test_more_adapters_than_slots_evicts_lru_and_answers_right(served):
    from ray import serve

    dep, info = served
    client = _client(dep)
    order = [0, 1, 2, 0, 2, 1, 0]
    for i in order:
        assert _complete(client, f"{info['names'][i]}/1") == info["answers"][i]
    stats = serve.get_deployment_handle("AdapterEngine", info["spec"].name).stats.remote().result()
    assert len(stats["adapters"]) <= 2 and stats["evictions"] >= 3


def test_streaming_and_chat_with_the_openai_client(served):
    dep, info = served
    client = _client(dep)
    name = f"{info['names'][1]}/1"
    chunks = list(client.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == info["answers"][1]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with httpx.stream("POST", dep.url + "/v1/completions", headers={"Authorization": f"Bearer {dep.api_key}"},
                      json={"model": name, "prompt": PROMPT, "max_tokens": 3, "stream": True}, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    tok = info["tok"]
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)
    want = tok.decode(hf_generate(info["spec"].base_model, info["folders"][1], ids, MAX_NEW), skip_special_tokens=True)
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_NEW, temperature=0)
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_NEW, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    parts = list(streamed)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want
    assert parts[-1].usage.prompt_tokens == len(ids)


def _post(dep, body, key="default", raw=None, timeout: float = 60):
    headers = {} if key is None else {"Authorization": f"Bearer {dep.api_key if key == 'default' else key}"}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(dep.url + "/v1/completions", content=raw, headers=headers, timeout=timeout)
    return httpx.post(dep.url + "/v1/completions", json=body, headers=headers, timeout=timeout)


def test_bad_input_gets_openai_errors(served):
    dep, info = served
    ok = {"model": f"{info['names'][0]}/1", "prompt": PROMPT, "max_tokens": 4}
    cases = [
        ({**ok, "model": "no-such-adapter@production"}, 404, "model_not_found"),
        ({**ok, "model": f"{info['names'][0]}/99"}, 404, "model_not_found"),
        ({**ok, "model": f"{info['wrong'].name}/1"}, 400, None),
        ({**ok, "max_tokens": -5}, 400, None),
        ({**ok, "prompt": "word " * 600}, 400, None),
        ({**ok, "n": 17}, 400, None),
        ({k: v for k, v in ok.items() if k != "model"}, 400, None),
    ]
    for body, status, code in cases:
        r = _post(dep, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"]
        if code:
            assert err["code"] == code
    assert "another-base" in _post(dep, cases[2][0]).json()["error"]["message"]
    assert "maximum context length" in _post(dep, cases[4][0]).json()["error"]["message"]
    assert _post(dep, None, raw=b"{not json").status_code == 400
    assert _post(dep, ok, key=None).status_code == 401
    assert _post(dep, ok, key="wrong-key-123").json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _complete(_client(dep, key="wrong-key-123"), ok["model"])
    with pytest.raises(openai.NotFoundError):
        _complete(_client(dep), "nope@production")


def _burst(dep, model: str, n: int, max_tokens: int = 24, timeout: float = 60):
    def one(_):
        start = time.monotonic()
        try:
            r = _post(dep, {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0},
                      timeout=timeout)
            return r.status_code, time.monotonic() - start, r
        except httpx.HTTPError as exc:
            return type(exc).__name__, time.monotonic() - start, None

    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _engine_stats(info):
    from ray import serve

    return serve.get_deployment_handle("AdapterEngine", info["spec"].name).stats.remote().result()


def test_overload_is_refused_and_accepted_requests_succeed(served):
    dep, info = served
    model = f"{info['names'][1]}/1"
    capacity = info["spec"].max_ongoing_requests + info["spec"].max_queued_requests
    rss = []
    for _ in range(2):
        results = _burst(dep, model, 10 * capacity)
        codes = [c for c, _, _ in results]
        assert set(codes) <= {200, 429, 503}, codes
        refused = [(c, t, r) for c, t, r in results if c in (429, 503)]
        assert refused and codes.count(200) >= capacity // 2
        assert all(r.headers.get("retry-after") for _, _, r in refused)
        # How fast a refusal comes is a latency, which belongs in a benchmark; here only codes and states.
        for c, _, r in results:
            if c == 200:
                assert r.json()["choices"][0]["text"] and r.json()["usage"]["completion_tokens"] > 0
        rss.append(_engine_stats(info)["rss_mb"])
    assert rss[1] - rss[0] < 100, rss  # memory flat between two overload bursts


def test_killed_replica_under_load_no_hang_and_recovers(served):
    import ray
    from ray import serve

    dep, info = served
    app = info["spec"].name
    model = f"{info['names'][1]}/1"
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if "AdapterEngine" in a["name"] and app in a["name"]]
    assert victims
    with cf.ThreadPoolExecutor(1) as pool:
        # Each request may take minutes while Serve replaces the replica on a machine with load average 30 (seen
        # in CI beside other work); a hang is a request with no answer at all, which these bounds still catch.
        load = pool.submit(_burst, dep, model, 6, 48, 300)
        time.sleep(0.5)
        ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
        results = load.result(timeout=600)  # nothing hangs
    # Every request is answered: done, refused (429/503 with Retry-After), or cut off at the spec's
    # request_timeout_s (504) while the only replica's replacement is still loading its model (seen in CI with
    # load average 30, where that takes longer than this deployment's 30 s deadline).
    assert {c for c, _, _ in results} <= {200, 429, 503, 504}, [c for c, _, _ in results]
    deadline = time.monotonic() + 300
    while True:
        try:
            r = _post(dep, {"model": model, "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0}, timeout=120)
            seen = r.text
        except httpx.HTTPError as exc:  # a slow answer while the replacement starts: ask again until the deadline
            r, seen = None, repr(exc)
        if r is not None and r.status_code == 200 and str(serve.status().applications[app].status).endswith(
                "RUNNING"):
            break
        assert time.monotonic() < deadline, seen
        time.sleep(1)
    assert r.json()["choices"][0]["text"] == info["answers"][1]


def test_health_needs_no_key_and_everything_else_does(served):
    dep, _ = served
    assert httpx.get(dep.url + "/health", timeout=60).status_code == 200
    assert httpx.get(dep.url + "/v1/models", timeout=60).status_code == 401


def test_dora_is_served_over_http_as_hf_peft_answers_and_ia3_is_refused(served, tiny_model, tmp_path):
    import peftray
    from peftray.registry import register_adapter
    from transformers import AutoModelForCausalLM

    dep, info = served
    tag = info["spec"].name
    torch.manual_seed(5)
    cfg = peftray.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    dora = peftray.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), cfg)
    with torch.no_grad():
        for name, p in dora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    dora.save_pretrained(tmp_path / "dora")
    ia3 = peftray.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                 peftray.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    dv = register_adapter(tmp_path / "dora", f"{tag}-dora", base_model=str(tiny_model))
    iv = register_adapter(tmp_path / "ia3", f"{tag}-ia3", base_model=str(tiny_model))
    want = info["tok"].decode(hf_generate(tiny_model, tmp_path / "dora", info["ids"], MAX_NEW),
                              skip_special_tokens=True)
    assert want != info["answers"]["base"]  # the DoRA weights change the answer
    assert _complete(_client(dep), f"{dv.name}/{dv.version}") == want
    r = _post(dep, {"model": f"{iv.name}/{iv.version}", "prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 400 and "IA3" in r.json()["error"]["message"], r.text


def test_serve_cli_deploys_an_allow_list_with_a_request_timeout_then_status_and_down(served, tmp_path):
    """`peftray serve deploy|status|down` on a second app that may serve only `n0@production` and `n1/1`, and
    cuts every generation off at once (request_timeout_s): allowed names pass the allow-list and get 504, the
    rest 404 before any work."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    dep, info = served
    n0, n1, n2 = info["names"]
    app = info["spec"].name + "cli"
    spec = {"name": app, "base_model": str(info["spec"].base_model), "adapters": [f"{n0}@production", f"{n1}/1"],
            "request_timeout_s": 0.001, "num_cpus": 0, "torch_threads": 1, "api_key": dep.api_key}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(spec))

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "peftray", "serve", *args], capture_output=True, text=True,
                              timeout=600, env=dict(os.environ))
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    out = cli("deploy", str(tmp_path / "serve.yaml"))
    url = out.split(" at ", 1)[1].split()[0].removesuffix("/v1")
    try:
        assert json.loads(cli("status", "--json"))[app]["status"] == "RUNNING"
        for model, status in ((f"{n0}@production", 504), (f"{n1}/1", 504), (f"{n0}/1", 404), (f"{n1}@production", 404),
                              (f"{n2}@production", 404)):
            r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": MAX_NEW},
                           headers={"Authorization": f"Bearer {dep.api_key}"}, timeout=120)
            assert r.status_code == status, (model, r.text)
            if status == 504:
                assert "request_timeout_s" in r.json()["error"]["message"]
        listed = {m["id"] for m in httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {dep.api_key}"},
                                             timeout=60).json()["data"]}
        assert {f"{n0}@production", f"{n1}/1"} <= listed and f"{n2}@production" not in listed
    finally:
        assert app in cli("down", app)
    assert app not in json.loads(cli("status", "--json"))
    assert info["spec"].name in json.loads(cli("status", "--json"))  # the other app is untouched
