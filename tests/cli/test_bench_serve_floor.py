"""The floor replica of `peftray bench serve` streams what a real completion stream carries, at the pace asked.

Its tokens/s bounds the HTTP load's ratio from above, so it must send exactly one chunk per token (no batching that
a real stream could not do), in the shape the OpenAI client parses, and never faster than the pace it was given.
"""

from __future__ import annotations

import asyncio
import json
import time

from peftray.bench._serve_floor import _stream


def _collect(tokens: int, interval_s: float) -> tuple[list[str], list[float]]:
    async def run() -> tuple[list[str], list[float]]:
        out, at = [], []
        async for chunk in _stream("floor", tokens, interval_s):
            out.append(chunk)
            at.append(time.perf_counter())
        return out, at

    return asyncio.run(run())


def test_one_chunk_per_token_then_usage_and_done():
    chunks, _ = _collect(5, 0.0)
    assert chunks[-1] == "data: [DONE]\n\n"
    assert all(c.startswith("data: ") and c.endswith("\n\n") for c in chunks)
    objs = [json.loads(c[6:]) for c in chunks[:-1]]
    texts = [o["choices"][0]["text"] for o in objs if o["choices"]]
    assert len(texts) == 5 and all(t for t in texts)
    assert all(o["object"] == "text_completion" and o["model"] == "floor" for o in objs)
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == 5


def test_chunks_keep_the_pace_they_were_given():
    interval = 0.05
    start = time.perf_counter()
    _, at = _collect(4, interval)
    # token i is not sent before start + i * interval (sleeping can only be late, never early)
    for i, t in enumerate(at[:4]):
        assert t - start >= i * interval - 1e-3, (i, t - start)
