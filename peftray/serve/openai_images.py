"""`POST /v1/images/generations`: OpenAI's Images API on a text_to_image deployment.

The route resolves `model` with the deployment's resolver (base, `name@alias`, `name/3`, `ft:` names, the
allow-list, alias polling) and hands one job per request to the backend, as the text routes do; the engine
replica batches it with whatever else is denoising. The answer is `{"created", "data": [{"b64_json",
"revised_prompt": null}]}`; `response_format: "url"` is refused, since the server stores no images.
"""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse

from peftray.serve.openai_errors import counted, error_response, one_answer
from peftray.serve.openai_schema import ImageRequest


async def serve_images(backend, body: ImageRequest):
    if body.response_format == "url":
        return counted(backend, "unresolved", error_response(
            400, '`response_format` "url" is not supported: this server stores no images. Use "b64_json".',
            "invalid_request", "response_format"))
    out = await one_answer(backend, body.model, "text_to_image", "/v1/images/generations", {"image": body.params()})
    if isinstance(out, JSONResponse):
        return out
    _, last = out
    return {"created": int(time.time()),
            "data": [{"b64_json": png, "revised_prompt": None} for png in last.get("images", [])]}
