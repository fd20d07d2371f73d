"""The floor of `peftray bench serve`'s HTTP overhead: the cheapest OpenAI-shaped endpoint behind Serve's proxy.

One FastAPI ingress replica that parses the completion request and answers at once, with no model and no second
hop. A request to it pays what every request through Serve's HTTP proxy pays (client -> proxy -> router ->
replica and back); `bench_http` times it beside each 8-token request, so (in-process + floor) / in-process is
the least the HTTP arm's ratio to the in-process engine can be on this machine, whatever the deployment does.
"""

# no `from __future__ import annotations`: Serve rebuilds the class routes' signatures, and a string `Request`
# annotation is then taken for a query parameter (every request 422)

import time

from fastapi import FastAPI, Request
from ray import serve

floor_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(floor_api)
class FloorIngress:
    @floor_api.post("/v1/completions")
    async def completions(self, request: Request) -> dict:
        body = await request.json()
        return {"id": "cmpl-floor", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model", ""), "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def start(name: str, wait_s: float = 300.0) -> None:
    """Run the floor app at /NAME on the Serve instance the caller is connected to; wait until it runs."""
    from peftray.serve.lifecycle import _wait_running

    serve.run(FloorIngress.bind(), name=name, route_prefix=f"/{name}", blocking=False)
    _wait_running(name, wait_s)


def stop(name: str) -> None:
    serve.delete(name)
