"""The OpenAI routes in one process, fast: the real FastAPI app, the real engine replica class (AdapterEngine,
constructed without Serve) and the real `openai` client over httpx's ASGI transport; the base model only (no
registry). The same features through a deployed app are in test_openai_fields.py; this file checks the
request -> engine -> response shaping without a stack. References: transformers in float64."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from serve_helpers import InProcessBackend, reference_steps

KEY = "inprocess-key"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "n"],
          "properties": {"city": {"type": "string", "maxLength": 10}, "n": {"type": "integer", "maximum": 999}}}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 8}}}}}


@pytest.fixture(scope="module")
def api(tiny_model):
    from peftray.serve import openai_api
    from peftray.serve.app import AdapterEngine
    from peftray.serve.serve_spec import ServeConfig

    spec = ServeConfig(name="inproc", base_model=str(tiny_model), model_id="tiny", torch_threads=1, api_key=KEY)
    replica = AdapterEngine.func_or_class(spec.model_dump())
    backend = InProcessBackend(replica, spec, KEY)
    app = openai_api.make_app(lambda: backend)
    try:
        yield app, replica.tokenizer, tiny_model
    finally:
        replica.engine.close()


def _run(app, fn):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key=KEY, http_client=http, max_retries=0)
            return await fn(client, http)

    return asyncio.run(go())


def test_completion_fields_match_float64_reference(api):
    app, tok, base = api
    prompt = "the quick brown fox"
    ids = tok.encode(prompt)
    want, logps = reference_steps(base, None, ids, 8, presence=1.0, frequency=0.5)

    async def fn(c, _):
        out = await c.completions.create(model="tiny", prompt=[prompt, prompt], max_tokens=8, temperature=0,
                                         logprobs=2, presence_penalty=1.0, frequency_penalty=0.5)
        sampled = [await c.completions.create(model="tiny", prompt=prompt, n=3, seed=4, max_tokens=8)
                   for _ in range(2)]
        echo = await c.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True)
        return out, sampled, echo

    out, sampled, echo = _run(app, fn)
    text = tok.decode(want, skip_special_tokens=True)
    assert [ch.text for ch in out.choices] == [text, text] and [ch.index for ch in out.choices] == [0, 1]
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == text and len(lp.token_logprobs) == len(want)
    assert all(abs(g - float(r[t])) < 1e-4 for g, t, r in zip(lp.token_logprobs, want, logps))
    assert out.usage.prompt_tokens == 2 * len(ids)  # two prompts (even if equal): each counted
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert len({c.text for c in sampled[0].choices}) > 1
    assert echo.choices[0].text.startswith(prompt) and len(echo.choices[0].text) > len(prompt)


def test_structured_output_tools_and_streaming(api):
    app, _, _ = api
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}
    msgs = [{"role": "user", "content": "hi"}]

    async def fn(c, _):
        structured = await c.chat.completions.create(model="tiny", messages=msgs, max_tokens=80, temperature=1.0,
                                                     seed=1, n=3, response_format=fmt)
        forced = await c.chat.completions.create(model="tiny", messages=msgs, max_tokens=80, tools=[TOOL],
                                                 tool_choice="required", seed=2)
        stream = await c.chat.completions.create(model="tiny", messages=msgs, max_tokens=80, tools=[TOOL],
                                                 tool_choice="required", seed=2, stream=True)
        return structured, forced, [ch async for ch in stream]

    structured, forced, chunks = _run(app, fn)
    for ch in structured.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.message.content), SCHEMA)
    call = forced.choices[0].message.tool_calls[0]
    assert forced.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), TOOL["function"]["parameters"])
    streamed = [d.choices[0].delta.tool_calls[0] for d in chunks if d.choices and d.choices[0].delta.tool_calls]
    assert streamed[0].function.arguments == call.function.arguments  # same seed, same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_refusals_name_the_field_and_metrics_count(api):
    app, _, _ = api

    async def fn(c, http):
        codes = {}
        for field, value in (("suffix", "x"), ("logit_bias", {"1": 2}), ("n", 17)):
            try:
                await c.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={field: value})
            except openai.BadRequestError as exc:
                codes[field] = exc.body["message"]
        await c.completions.create(model="tiny", prompt="hi", max_tokens=2)
        return codes, (await http.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})).text

    codes, metrics = _run(app, fn)
    assert set(codes) == {"suffix", "logit_bias", "n"} and all(f in m for f, m in codes.items())
    assert 'peftray_requests_total{model="base",status="200"}' in metrics
    assert "peftray_engine_running_rows" in metrics and "peftray_time_to_first_token_seconds_bucket" in metrics
