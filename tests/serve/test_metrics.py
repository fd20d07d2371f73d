"""The Prometheus metrics of the ingress (pure logic, no server) and the Grafana dashboard over them."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from peftray.serve.metrics import ServeMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "peftray-serve.json"


async def _events():
    for n in (1, 3, 4):
        yield {"completion_tokens": n, "prompt_tokens": 5, "text": "x"}
    yield {"completion_tokens": 4, "prompt_tokens": 5, "finished": True, "finish_reason": "stop",
           "engine": {"pid": 42, "queued": 2, "running": 3, "loads": 7, "evictions": 1, "load_seconds": 0.5,
                      "loaded": 2}}


def _samples(m: ServeMetrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_one_request_is_counted_timed_and_reports_its_replica():
    m = ServeMetrics()

    async def run():
        return [ev async for ev in m.observe(_events(), "a/1")]

    assert len(asyncio.run(run())) == 4
    m.finished("a/1", 200)
    got = _samples(m)
    assert got[("peftray_requests_total", (("model", "a/1"), ("status", "200")))] == 1
    assert got[("peftray_generation_tokens_total", (("model", "a/1"),))] == 4
    assert got[("peftray_prompt_tokens_total", (("model", "a/1"),))] == 5
    assert got[("peftray_time_to_first_token_seconds_count", (("model", "a/1"),))] == 1
    assert got[("peftray_inter_token_latency_seconds_count", (("model", "a/1"),))] == 3  # tokens 2, 3 and 4
    assert got[("peftray_engine_queue_depth", (("replica", "42"),))] == 2
    assert got[("peftray_adapter_load_seconds_total", (("replica", "42"),))] == 0.5


def test_the_dashboard_queries_only_series_that_exist():
    dash = json.loads(DASHBOARD.read_text())
    names = {s for fam in text_string_to_metric_families(ServeMetrics().render().decode()) for s in [fam.name]}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\bpeftray_[a-z_]+", e)}
    known = set()
    for n in names:
        known |= {n, n + "_total", n + "_bucket", n + "_count", n + "_sum"}
    assert used and used <= known, used - known
    assert {"peftray_time_to_first_token_seconds_bucket", "peftray_adapter_evictions_total"} <= used


def test_proxy_errors_become_openai_json_with_retry_after():
    """The proxy middleware on a real ASGI app that fails the way Serve's proxy does (no mock of Serve)."""
    import httpx

    from peftray.serve.proxy_errors import OpenAIProxyErrors

    async def dies(scope, receive, send):  # what the proxy does when the ingress replica dies mid-request
        raise RuntimeError("ActorDiedError: the actor died unexpectedly")

    async def plain_503(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Service unavailable"})

    async def app_json(scope, receive, send):
        await send({"type": "http.response.start", "status": 429, "headers": [(b"content-type", b"application/json"),
                                                                            (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "busy"}}'})

    async def get(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=OpenAIProxyErrors(app)),
                                     base_url="http://t") as c:
            return await c.post("/v1/completions", json={})

    for app, status in ((dies, 503), (plain_503, 503)):
        r = asyncio.run(get(app))
        assert r.status_code == status and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_error" and "retry" in r.json()["error"]["message"]
    r = asyncio.run(get(app_json))
    assert r.status_code == 429 and r.json() == {"error": {"message": "busy"}} and r.headers["retry-after"] == "2"


def test_proxy_gate_refuses_past_capacity_at_once_and_lets_the_rest_through():
    """Three slow requests against capacity 2: the third gets 429 JSON while the two are still running."""
    import httpx

    from peftray.serve.proxy_gate import AdmissionGate

    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = AdmissionGate(slow_app, lookup=lambda app: 2 if app == "tiny" else None)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://t") as c:
            first = [asyncio.create_task(c.post("/tiny/v1/completions", json={})) for _ in range(2)]
            while gate.inflight.get("tiny", 0) < 2:
                await asyncio.sleep(0.01)
            refused = await c.post("/tiny/v1/chat/completions", json={})
            other_app = asyncio.create_task(c.post("/other/v1/completions", json={}))  # not gated: no capacity
            release.set()
            return refused, [await t for t in first], await other_app

    refused, accepted, other = asyncio.run(run())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "capacity 2" in refused.json()["error"]["message"]
    assert [r.status_code for r in accepted] == [200, 200] and other.status_code == 200
    assert gate.inflight == {"tiny": 0, "other": 0}  # every request let through was counted out again
