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
