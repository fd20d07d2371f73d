"""`POST /v1/images/generations`: OpenAI's Images API on a text_to_image deployment.

The route resolves `model` with the deployment's resolver (base, `name@alias`, `name/3`, `ft:` names, the
allow-list, alias polling) and hands one job per request to the backend, as the text routes do; the engine
replica batches it with whatever else is denoising. The answer is `{"created", "data": [{"b64_json",
"revised_prompt": null}]}`; `response_format: "url"` is refused, since the server stores no images.
"""

from __future__ import annotations

import time

from peftray.serve.openai_errors import _with_deadline, error_response, from_exception, wrong_task
from peftray.serve.openai_schema import ImageRequest


async def serve_images(backend, body: ImageRequest):
    metrics = getattr(backend, "metrics", None)

    def counted(label: str, response):
        if metrics is not None:
            metrics.finished(label, response.status_code if response is not None else 200)
        return response

    if body.response_format == "url":
        return counted("unresolved", error_response(
            400, '`response_format` "url" is not supported: this server stores no images. Use "b64_json".',
            "invalid_request", "response_format"))
    refused = wrong_task(backend, body.model, "text_to_image", "/v1/images/generations")
    if refused is not None:
        return counted("unresolved", refused)
    try:
        target = await backend.call(backend.resolver.resolve, body.model)
    except Exception as exc:  # noqa: BLE001
        return counted("unresolved", from_exception(exc, param="model"))
    label = target.key or "base"
    last: dict = {}
    try:
        async for ev in _with_deadline(backend.run(target, {"image": body.params()}), backend.request_timeout_s):
            last = ev
    except Exception as exc:  # noqa: BLE001
        return counted(label, from_exception(exc))
    if metrics is not None and last.get("engine"):
        metrics.engine_stats(last["engine"])
    counted(label, None)
    return {"created": int(time.time()),
            "data": [{"b64_json": png, "revised_prompt": None} for png in last.get("images", [])]}
