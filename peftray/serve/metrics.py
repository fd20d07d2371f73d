"""Prometheus metrics of a serving application, exposed by the ingress at `GET /metrics` (text format).

The ingress sees every request, so it counts requests, tokens and latencies (time to first token and
inter-token latency as the client sees them, by `model` = the resolved adapter version or the base model).
Engine replicas are other processes: each request's last event carries its replica's counters (queue depth,
running rows, slot loads, evictions, load time), and a scrape also asks one replica, so the gauges are per
replica (`replica` = its pid) without a metrics port of their own (issue 14: no extra listening ports).
"""

from __future__ import annotations

import time
from typing import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ENGINE = {  # field of AdapterEngine.stats() -> (metric name, help)
    "queued": ("peftray_engine_queue_depth", "requests waiting to join the batch"),
    "running": ("peftray_engine_running_rows", "rows in the running batch"),
    "loads": ("peftray_adapter_loads_total", "adapters read into slots since the replica started"),
    "evictions": ("peftray_adapter_evictions_total", "adapters evicted from slots since the replica started"),
    "load_seconds": ("peftray_adapter_load_seconds_total", "seconds spent reading adapters into slots"),
    "loaded": ("peftray_adapter_slots_used", "adapters held in slots now"),
}


class ServeMetrics:
    """The ingress's metrics, in a registry of its own (nothing global, one per ingress replica)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("peftray_requests", "requests by model and HTTP status", ["model", "status"],
                                registry=r)
        self.prompt_tokens = Counter("peftray_prompt_tokens", "prompt tokens by model", ["model"], registry=r)
        self.generated = Counter("peftray_generation_tokens", "generated tokens by model", ["model"], registry=r)
        self.ttft = Histogram("peftray_time_to_first_token_seconds", "time to first token", ["model"],
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("peftray_inter_token_latency_seconds", "time between tokens of one choice", ["model"],
                             buckets=_LATENCY, registry=r)
        self.inflight = Gauge("peftray_ingress_inflight_requests", "requests admitted and not finished", registry=r)
        self.engine = {k: Gauge(name, help_, ["replica"], registry=r) for k, (name, help_) in _ENGINE.items()}

    async def observe(self, events: AsyncIterator[dict], model: str) -> AsyncIterator[dict]:
        """`events` of one choice, timing its tokens and counting them when it ends."""
        start = last = time.perf_counter()
        seen = 0
        async for ev in events:
            n = int(ev.get("completion_tokens", 0))
            if n > seen:
                now = time.perf_counter()
                if seen == 0:
                    self.ttft.labels(model).observe(now - start)
                else:  # an event may carry several tokens: their mean gap
                    gap = (now - last) / (n - seen)
                    for _ in range(n - seen):
                        self.itl.labels(model).observe(gap)
                seen, last = n, now
            if ev.get("finished"):
                self.prompt_tokens.labels(model).inc(int(ev.get("prompt_tokens", 0)))
                self.generated.labels(model).inc(n)
                if ev.get("engine"):
                    self.engine_stats(ev["engine"])
            yield ev

    def finished(self, model: str, status: int) -> None:
        self.requests.labels(model, str(status)).inc()

    def engine_stats(self, stats: dict) -> None:
        replica = str(stats.get("pid", "?"))
        for key, gauge in self.engine.items():
            if key in stats:
                gauge.labels(replica).set(float(stats[key]))

    def render(self) -> bytes:
        return generate_latest(self.registry)
