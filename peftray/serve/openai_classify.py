"""`POST /v1/classify`: labels with scores from a seq_cls (text) or image_cls (base64 images) deployment.

    {"model": "sentiment@production", "input": ["great film", "dull"], "top_k": 2}
    -> {"id", "object": "list", "created", "model",
        "data": [{"index": 0, "label": "positive", "score": 0.93, "scores": [{"label", "score"}, ...]}, ...],
        "usage": {"inputs": 2, "prompt_tokens": 9, "total_tokens": 9}}

The route resolves `model` with the deployment's resolver (base, `name@alias`, `name/3`, `ft:` names, the
allow-list, alias polling) and hands one job per request to the backend, as the other routes do; the engine
replica runs its inputs in the same forwards as whatever else is waiting, each row with its own adapter. Labels
are the base model config's `id2label` (or the serve spec's `labels`); scores are probabilities.
"""

from __future__ import annotations

import time
import uuid

from fastapi.responses import JSONResponse

from peftray.serve.openai_errors import one_answer
from peftray.serve.openai_schema import ClassifyRequest
from peftray.serve.serve_spec import CLASSIFY_TASKS


async def serve_classify(backend, body: ClassifyRequest):
    job = {"classify": {"input": body.inputs(), "top_k": body.top_k}}
    out = await one_answer(backend, body.model, CLASSIFY_TASKS, "/v1/classify", job)
    if isinstance(out, JSONResponse):
        return out
    label, last = out
    usage = last.get("usage", {})
    metrics = getattr(backend, "metrics", None)
    if metrics is not None:
        metrics.prompt_tokens.labels(label).inc(int(usage.get("prompt_tokens", 0)))
    return {"id": "clsf-" + uuid.uuid4().hex[:24], "object": "list", "created": int(time.time()),
            "model": body.model, "data": last.get("data", []), "usage": usage}
