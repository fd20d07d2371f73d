"""Load for `peftray bench serve` over HTTP: any OpenAI-compatible endpoint (streamed, so TTFT is measured),
overload refusal latencies, and structured output against free decoding in-process."""

from __future__ import annotations

import concurrent.futures as cf
import json
import statistics
import time
from typing import Optional

PROMPT = "request {i}: the quick brown fox jumps over the lazy dog"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6}}}


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of seconds, in ms (nan when empty)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


def _one(http, model: str, i: int, max_tokens: int,
         extra: Optional[dict] = None) -> tuple[float, float, int, int]:
    """(latency s, TTFT s, completion tokens, chunks with text) of one streamed completion (`extra`: more body
    fields)."""
    body = {"model": model, "prompt": PROMPT.format(i=i), "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    start, first, tokens, chunks = time.perf_counter(), None, 0, 0
    with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("choices") and obj["choices"][0].get("text"):
                chunks += 1
                first = first or time.perf_counter()
            if obj.get("usage"):
                tokens = int(obj["usage"]["completion_tokens"])
    end = time.perf_counter()
    return end - start, (first or end) - start, tokens, chunks


def drive(url: str, api_key: str, models: list[str], requests: int, concurrency: int, max_tokens: int,
          extra: Optional[dict] = None) -> dict:
    """`requests` streamed completions, `concurrency` at a time, spread over `models`: latency, TTFT, tokens/s
    (`extra`: more fields of every request's body)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=url.rstrip("/").removesuffix("/v1"), timeout=300, limits=limits,
                      headers={"Authorization": f"Bearer {api_key}"}) as http:
        _one(http, models[0], 0, max_tokens, extra)  # warm-up
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            out = list(pool.map(lambda i: _one(http, models[i % len(models)], i, max_tokens, extra), range(requests)))
        wall = time.perf_counter() - start
    lat, ttft, toks, chunks = [o[0] for o in out], [o[1] for o in out], sum(o[2] for o in out), sum(o[3] for o in out)
    return {"requests": requests, "concurrency": concurrency, "latency_p50_ms": pct(lat, 0.5),
            "latency_p99_ms": pct(lat, 0.99), "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "tokens_per_s": toks / wall, "completion_tokens": toks,
            "text_chunks_per_s": chunks / wall, "text_chunks": chunks}


def refusals(url: str, api_key: str, model: str, n: int, max_tokens: int = 16) -> dict:
    """`n` requests at once (10x the capacity): how fast the refused ones are answered, and whether every
    accepted one succeeded.

    The client is one asyncio event loop (aiohttp), not a thread per request: on a 2-core machine `n` client
    threads contend for the GIL and the cores with the server, and their own scheduling shows up as refusal
    latency. Each latency runs from the moment that request is handed to the connection to its status line.
    """
    import asyncio

    import aiohttp

    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"}

    async def one(http, gate: asyncio.Event, i: int) -> tuple[object, float]:
        body = {"model": model, "prompt": PROMPT.format(i=i), "max_tokens": max_tokens, "temperature": 0}
        await gate.wait()
        t0 = time.perf_counter()
        try:
            async with http.post(f"{base}/v1/completions", json=body) as r:
                status, took = r.status, time.perf_counter() - t0
                data = await r.json(content_type=None)
            ok = status != 200 or data["choices"][0]["text"] is not None
            return (status if ok else "empty"), took
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return type(exc).__name__, time.perf_counter() - t0

    async def burst() -> list:
        conn = aiohttp.TCPConnector(limit=n, force_close=False)
        async with aiohttp.ClientSession(connector=conn, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=300)) as http:
            gate = asyncio.Event()
            tasks = [asyncio.create_task(one(http, gate, i)) for i in range(n)]
            await asyncio.sleep(0)  # every task is waiting at the gate: then all go at once
            gate.set()
            return await asyncio.gather(*tasks)

    out = asyncio.run(burst())
    refused = [t for c, t in out if c in (429, 503)]
    other = sorted({str(c) for c, _ in out if c not in (200, 429, 503)})
    return {"concurrent": n, "accepted": sum(c == 200 for c, _ in out), "refused": len(refused),
            "failed_other": other, "refusal_p50_ms": pct(refused, 0.5), "refusal_p99_ms": pct(refused, 0.99),
            "accepted_p50_ms": pct([t for c, t in out if c == 200], 0.5), "client": "asyncio (aiohttp)"}


def structured_vs_free(engine, tok, slot, batch: int, max_tokens: int, reps: int) -> dict:
    """Tokens/s of `batch` rows under a JSON schema ÷ the same rows free, arms alternated over `reps`."""
    import threading

    from peftray.serve.engine import SamplingParams

    def arm(schema: Optional[dict]) -> float:
        done, errors = [], []
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0)

        def one(i: int) -> None:
            try:
                done.append(engine.generate(tok.encode(PROMPT.format(i=i)), params, slot, schema=schema))
            except Exception as exc:  # noqa: BLE001 - reported below: a failed arm must not read as 0 tokens/s
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(batch)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"{len(errors)} of {batch} requests failed; first: {errors[0]!r}") from errors[0]
        return sum(ev.completion_tokens for ev in done) / (time.perf_counter() - start)

    arm(SCHEMA)  # warm-up (compiles the grammar once)
    ratios = []
    for _ in range(reps):
        free, constrained = arm(None), arm(SCHEMA)
        ratios.append(constrained / free)
    return {"json_schema_over_free_median": statistics.median(ratios),
            "json_schema_over_free_spread": max(ratios) - min(ratios), "reps": reps}
