"""The floor of `peftray bench serve`'s HTTP overhead: the cheapest OpenAI-shaped endpoint behind Serve's proxy.

One FastAPI ingress replica that parses the completion request and answers with no model and no second hop.
A request to it pays what every request through Serve's HTTP proxy pays (client -> proxy -> router -> replica and
back):
- unstreamed, it answers at once; `bench_http` times it beside each 8-token request, so (in-process + floor) /
  in-process is the least the HTTP arm's ratio to the in-process engine can be on this machine;
- streamed (`"stream": true`), it sends `max_tokens` one-token chunks (the chunk shape peftray's route sends, then
  the usage chunk and `[DONE]`), one every `floor_interval_s` seconds: the pace at which the in-process engine
  produced each request's tokens in the same load round. Its tokens/s under the load's clients is the most any
  deployment behind Serve's proxy can stream at that pace here, since a real one adds its model's work and its
  own hops on the same cores.
"""

# no `from __future__ import annotations`: Serve rebuilds the class routes' signatures, and a string `Request`
# annotation is then taken for a query parameter (every request 422)

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from peftray.serve import openai_shape as shape

floor_api = FastAPI()


async def _stream(model: str, tokens: int, interval_s: float):
    start = time.perf_counter()
    for i in range(tokens):
        wait = start + i * interval_s - time.perf_counter()  # a fixed pace: a late chunk does not delay the next
        if wait > 0:
            await asyncio.sleep(wait)
        yield shape.chunk("cmpl-floor", model, False, 0, {}, text=" x")  # the route's own chunk
    done = shape.Choice(0, 0, last={"prompt_tokens": 0, "completion_tokens": tokens})
    yield shape.usage_chunk("cmpl-floor", model, False, [done])
    yield "data: [DONE]\n\n"


# as many requests at once as peftray's ingress takes (Serve's default, 5, would queue the load's clients)
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2000)
@serve.ingress(floor_api)
class FloorIngress:
    @floor_api.post("/v1/completions")
    async def completions(self, request: Request):
        body = await request.json()
        model = body.get("model", "")
        if body.get("stream"):
            tokens, interval_s = int(body.get("max_tokens", 16)), float(body.get("floor_interval_s", 0.0))
            return StreamingResponse(_stream(model, tokens, interval_s), media_type="text/event-stream")
        return {"id": "cmpl-floor", "object": "text_completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def start(name: str, wait_s: float = 300.0) -> None:
    """Run the floor app at /NAME on the Serve instance the caller is connected to; wait until it runs."""
    from peftray.serve.lifecycle import _wait_running

    serve.run(FloorIngress.bind(), name=name, route_prefix=f"/{name}", blocking=False)
    _wait_running(name, wait_s)


def stop(name: str) -> None:
    serve.delete(name)
