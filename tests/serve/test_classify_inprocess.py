"""`POST /v1/classify` in one process: the real FastAPI app and the real replica class (ClassifierEngine,
constructed without Serve) over httpx's ASGI transport; the base models only (adapters resolve through the
registry: see test_classify_stack.py). References: transformers' own forward of the same base."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from classify_helpers import LABELS, TEXTS, hf_image_logits, hf_text_logits, png_b64
from serve_helpers import InProcessBackend

KEY = "classify-key"


def _post(app, path: str, body: dict) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            return await http.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"})

    return asyncio.run(go())


def _app(spec):
    from peftray.serve import openai_api
    from peftray.serve.classify_replica import ClassifierEngine

    replica = ClassifierEngine.func_or_class(spec.model_dump())
    return openai_api.make_app(lambda: InProcessBackend(replica, spec, KEY)), replica


@pytest.fixture(scope="module")
def apps(minilm_model, tiny_vit):
    """{"text": app, "image": app}: MiniLM (seq_cls) and the tiny ViT (image_cls); only `cls-only` besides the
    bases may be served, so other names are refused without asking a registry."""
    from peftray.serve.serve_spec import ServeConfig

    threads = torch.get_num_threads()
    common = dict(adapters=["cls-only"], api_key=KEY, torch_threads=1)
    text, text_replica = _app(ServeConfig(name="txt", base_model=str(minilm_model), model_id="minilm",
                                          task="seq_cls", labels=LABELS, **common))
    image, image_replica = _app(ServeConfig(name="img", base_model=str(tiny_vit), model_id="tiny-vit",
                                            task="image_cls", **common))
    try:
        yield {"text": text, "image": image}
    finally:
        text_replica.engine.close()
        image_replica.engine.close()
        torch.set_num_threads(threads)


def _probs(data: list[dict], labels: list[str]) -> torch.Tensor:
    return torch.tensor([[next(s["score"] for s in d["scores"] if s["label"] == name) for name in labels]
                         for d in data])


def test_texts_get_labels_and_the_base_models_probabilities(apps, minilm_model):
    got = _post(apps["text"], "/v1/classify", {"model": "minilm", "input": TEXTS})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["object"] == "list" and body["model"] == "minilm" and body["id"].startswith("clsf-")
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    want = hf_text_logits(minilm_model, None, TEXTS).softmax(-1)
    torch.testing.assert_close(_probs(body["data"], LABELS), want, atol=1e-5, rtol=1e-5)
    for d in body["data"]:
        assert d["label"] == d["scores"][0]["label"] and d["score"] == d["scores"][0]["score"]
    assert body["usage"]["inputs"] == 4 and body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 8
    one = _post(apps["text"], "/v1/classify", {"model": "minilm", "input": TEXTS[0], "top_k": 1}).json()
    assert len(one["data"]) == 1 and len(one["data"][0]["scores"]) == 1
    assert one["data"][0]["label"] == body["data"][0]["label"]


def test_images_get_the_configs_labels_and_the_base_models_probabilities(apps, tiny_vit):
    from peftray.data.shapes import colour_classes

    images = [png_b64(1), "data:image/png;base64," + png_b64(2)]
    got = _post(apps["image"], "/v1/classify", {"model": "tiny-vit", "input": images, "top_k": 2})
    assert got.status_code == 200, got.text
    data = got.json()["data"]
    assert all(len(d["scores"]) == 2 and d["label"] in colour_classes() for d in data)
    want = hf_image_logits(tiny_vit, None, [png_b64(1), png_b64(2)]).softmax(-1)
    got_top = torch.tensor([[s["score"] for s in d["scores"]] for d in data])
    torch.testing.assert_close(got_top, want.topk(2).values, atol=1e-5, rtol=1e-5)
    assert got.json()["usage"]["inputs"] == 2


@pytest.mark.parametrize("app, fields, status, param, needle", [
    ("text", {"input": []}, 400, "input", "empty list"),
    ("text", {"top_k": 0}, 400, "top_k", "top_k"),
    ("text", {"temperature": 0.5}, 400, "temperature", "temperature"),
    ("text", {"input": ["fine", png_b64(3)]}, 400, "input", "`input[1]` is an image"),
    ("text", {"model": "nobody@production"}, 404, "model", "nobody@production"),
    ("image", {"input": "a red circle, please"}, 400, "input", "`input[0]` is not base64 image data"),
    ("image", {"input": [png_b64(1), "aGVsbG8gd29ybGQ="]}, 400, "input", "not an image Pillow can decode"),
])
def test_bad_requests_get_openai_errors_naming_the_field(apps, app, fields, status, param, needle):
    body = {"model": "minilm" if app == "text" else "tiny-vit", "input": "fine", **fields}
    got = _post(apps[app], "/v1/classify", body)
    assert got.status_code == status, got.text
    err = got.json()["error"]
    assert err["param"] == param and needle in err["message"] and err["type"] == "invalid_request_error"


def test_the_other_routes_and_classify_on_a_text_deployment_are_refused_naming_model(apps, tiny_model):
    from peftray.serve import openai_api
    from peftray.serve.serve_spec import ServeConfig

    refused = [
        _post(apps["text"], "/v1/completions", {"model": "minilm", "prompt": "hi", "max_tokens": 2}),
        _post(apps["image"], "/v1/chat/completions", {"model": "tiny-vit", "messages": [{"role": "user",
                                                                                           "content": "hi"}]}),
        _post(apps["image"], "/v1/images/generations", {"model": "tiny-vit", "prompt": "a red circle"}),
    ]
    text_spec = ServeConfig(name="llm", base_model=str(tiny_model), model_id="tiny", api_key=KEY)
    text_app = openai_api.make_app(lambda: InProcessBackend(None, text_spec, KEY))
    refused.append(_post(text_app, "/v1/classify", {"model": "tiny", "input": "hi"}))
    for got in refused:
        assert got.status_code == 400, got.text
        assert got.json()["error"]["param"] == "model" and "deployment" in got.json()["error"]["message"]
    assert "needs a seq_cls or image_cls deployment" in refused[-1].json()["error"]["message"]
