"""The OpenAI fields real clients send, through the deployed app with the `openai` client: n, prompt lists,
logprobs, echo, stop, penalties, seed, refusals, /v1/models, structured output, tools, metrics.
One deployment for the module (tests/serve/conftest.py); reference values from HF PEFT in float64."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import jsonschema
import openai
import pytest

from serve_helpers import MAX_NEW, PROMPT, reference_steps

pytestmark = [pytest.mark.slow, pytest.mark.stack]

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "n", "ok"],
          "properties": {"city": {"type": "string", "maxLength": 10}, "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "ok": {"type": "boolean"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "maximum": 9}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["utc", "cet"]}}}}}


def _client(dep) -> openai.OpenAI:
    return openai.OpenAI(base_url=dep.url + "/v1", api_key=dep.api_key, max_retries=0, timeout=120)


def test_prompt_lists_n_seed_echo_and_stop(served):
    dep, info = served
    client, name = _client(dep), f"{info['names'][1]}/1"
    answer = info["answers"][1]
    out = client.completions.create(model=name, prompt=[PROMPT, "a b c"], max_tokens=MAX_NEW, temperature=0)
    assert [c.index for c in out.choices] == [0, 1] and out.choices[0].text == answer != out.choices[1].text
    ids = client.completions.create(model=name, prompt=[info["ids"], info["ids"]], max_tokens=MAX_NEW, temperature=0)
    assert [c.text for c in ids.choices] == [answer, answer] and ids.usage.prompt_tokens == 2 * len(info["ids"])
    kw = dict(model=name, prompt=[PROMPT, "a b c"], max_tokens=MAX_NEW, temperature=1.0, n=3, seed=7)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == list(range(6))
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seed: reproducible
    assert len({c.text for c in first.choices[:3]}) > 1  # the n choices are different samples
    echoed = client.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + answer
    stop = answer.strip()[2:4]
    cut = client.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0, stop=[stop, "zzzz"])
    assert cut.choices[0].text == answer[:answer.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_logprobs_and_penalties_match_hf_peft_in_float64(served):
    dep, info = served
    client, base = _client(dep), info["spec"].base_model
    name, folder = f"{info['names'][0]}/1", info["folders"][0]
    out = client.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0, logprobs=3,
                                    presence_penalty=1.2, frequency_penalty=0.6)
    want, logps = reference_steps(base, folder, info["ids"], MAX_NEW, presence=1.2, frequency=0.6)
    assert want != reference_steps(base, folder, info["ids"], MAX_NEW)[0]  # the penalties matter here
    choice = out.choices[0]
    assert choice.text == info["tok"].decode(want, skip_special_tokens=True)
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == len(want)
    for got, token, ref, top in zip(lp.token_logprobs, want, logps, lp.top_logprobs):
        assert abs(got - float(ref[token])) < 1e-4
        assert len(top) == 3 and abs(max(top.values()) - float(ref.max())) < 1e-4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_unsupported_fields_are_refused_by_name(served):
    dep, info = served
    ok = {"model": f"{info['names'][0]}/1", "prompt": PROMPT, "max_tokens": 4}
    headers = {"Authorization": f"Bearer {dep.api_key}"}
    for field, value in (("suffix", "end"), ("logit_bias", {"5": 10}), ("best_of", 2), ("logprobs", 9)):
        r = httpx.post(dep.url + "/v1/completions", json={**ok, field: value}, headers=headers, timeout=60)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
    chat = {"model": ok["model"], "messages": [{"role": "user", "content": "hi"}]}
    for extra in ({"response_format": {"type": "json_schema"}}, {"tool_choice": "required"},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}):
        r = httpx.post(dep.url + "/v1/chat/completions", json={**chat, **extra}, headers=headers, timeout=60)
        assert r.status_code == 400 and next(iter(extra)) in r.json()["error"]["message"], (extra, r.text)


def test_models_lists_every_reference_served_with_its_version(served):
    from peftray.registry import resolve

    dep, info = served
    client = _client(dep)
    models = {m.id: m.model_dump() for m in client.models.list().data}
    base = info["spec"].served_model_id
    assert models[base]["parent"] is None
    for name in info["names"]:
        for ref in (f"{name}@production", f"{name}@latest"):
            assert models[ref]["parent"] == base and models[ref]["owned_by"]
            assert models[ref]["version"] == resolve(ref).version and models[ref]["created"] > 0
            assert client.completions.create(model=ref, prompt=PROMPT, max_tokens=2).choices[0].text is not None
    assert f"{info['wrong'].name}@latest" not in models  # another base model: not served here


def test_structured_output_validates_in_a_mixed_adapter_batch(served):
    dep, info = served
    # the replica admits 8 (4 working + 4 queued): a real client retries a 429 after its Retry-After
    client = _client(dep).with_options(max_retries=5)
    # two adapters (the replica's two slots) and the base model in one batch
    models = [f"{n}/1" for n in info["names"][:2]] + [info["spec"].served_model_id]
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}

    def one(i):
        kw = dict(model=models[i % 3], messages=[{"role": "user", "content": f"place {i}"}], max_tokens=120,
                  temperature=1.0, seed=i)
        if i % 4 == 3:
            return client.chat.completions.create(**kw, response_format={"type": "json_object"})
        return client.chat.completions.create(**kw, response_format=fmt if i % 2 == 0 else None, n=2 if i % 2 else 1)

    with cf.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(one, range(12)))
    for i, out in enumerate(outs):
        for choice in out.choices:
            if i % 4 == 3:  # any object: a random model may write one longer than max_tokens
                assert choice.message.content.startswith("{")
                if choice.finish_reason == "stop":
                    assert isinstance(json.loads(choice.message.content), dict)
            elif i % 2 == 0:
                assert choice.finish_reason == "stop", choice.message.content
                jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_tool_calls_forced_required_and_follow_up(served):
    dep, info = served
    client, name = _client(dep), f"{info['names'][2]}/1"
    messages = [{"role": "user", "content": "weather in paris?"}]
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        out = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER, CLOCK],
                                             tool_choice=choice, max_tokens=120, temperature=1.0, seed=3)
        c = out.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        call = c.message.tool_calls[0]
        tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
        if isinstance(choice, dict):
            assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    plain = client.chat.completions.create(model=name, messages=messages, max_tokens=4, temperature=0)
    after = client.chat.completions.create(model=name, messages=follow, tools=[WEATHER], max_tokens=4, temperature=0)
    assert after.usage.prompt_tokens > plain.usage.prompt_tokens + 5  # the call and its result reached the prompt
    streamed = list(client.chat.completions.create(model=name, messages=messages, tools=[WEATHER], stream=True,
                                                   tool_choice="required", max_tokens=120, temperature=1.0, seed=3))
    calls = [d.choices[0].delta.tool_calls for d in streamed if d.choices and d.choices[0].delta.tool_calls]
    assert calls and json.loads(calls[0][0].function.arguments)["city"] is not None
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_streaming_n_choices_and_metrics(served):
    dep, info = served
    client, name = _client(dep), f"{info['names'][1]}/1"
    chunks = list(client.completions.create(model=name, prompt=[PROMPT, PROMPT], max_tokens=MAX_NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == {0: info["answers"][1], 1: info["answers"][1]}
    assert chunks[-1].usage.completion_tokens > 0
    r = httpx.get(dep.url + "/metrics", headers={"Authorization": f"Bearer {dep.api_key}"}, timeout=60)
    assert r.status_code == 200
    body = r.text
    for series in ("peftray_requests_total", "peftray_generation_tokens_total", "peftray_prompt_tokens_total",
                   "peftray_time_to_first_token_seconds_bucket", "peftray_inter_token_latency_seconds_bucket",
                   "peftray_engine_queue_depth", "peftray_engine_running_rows", "peftray_adapter_loads_total",
                   "peftray_adapter_evictions_total", "peftray_adapter_load_seconds_total"):
        assert series in body, series
    line = next(ln for ln in body.splitlines()
                if ln.startswith("peftray_requests_total") and f'model="{name}"' in ln and 'status="200"' in ln)
    assert float(line.split()[-1]) >= 1
    assert httpx.get(dep.url + "/metrics", timeout=60).status_code == 401


def test_killed_ingress_replica_answers_openai_errors_with_retry_after(served):
    """Issue 14 item 12: requests in flight when the ingress replica dies get 503 JSON + Retry-After, not a bare 500."""
    import time

    import ray
    from ray import serve

    dep, info = served
    app, model = info["spec"].name, f"{info['names'][1]}/1"
    headers = {"Authorization": f"Bearer {dep.api_key}"}

    def one(i):
        body = {"model": model, "prompt": PROMPT, "max_tokens": 200, "temperature": 1.0, "seed": i}
        try:
            return httpx.post(dep.url + "/v1/completions", json=body, headers=headers, timeout=120)
        except httpx.HTTPError as exc:
            return exc

    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if "OpenAIIngress" in a["name"] and app in a["name"])
    engine = serve.get_deployment_handle("AdapterEngine", app)
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        deadline = time.monotonic() + 60
        while engine.stats.remote().result()["running"] == 0:  # the requests are in the engine now
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
        results = [f.result(timeout=150) for f in futures]
    errors = [r for r in results if not (isinstance(r, httpx.Response) and r.status_code == 200)]
    assert errors, "no request was in flight when the ingress died"
    for r in errors:
        assert isinstance(r, httpx.Response), r
        assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
        assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["message"]
    deadline = time.monotonic() + 180
    while True:  # Serve replaces the ingress: answers again
        r = one(0)
        if isinstance(r, httpx.Response) and r.status_code == 200:
            break
        assert time.monotonic() < deadline, r
        time.sleep(1)
