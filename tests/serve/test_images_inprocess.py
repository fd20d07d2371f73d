"""`POST /v1/images/generations` in one process: the real FastAPI app, the real image replica class
(ImageEngine, constructed without Serve) and the unmodified `openai` client over httpx's ASGI transport; the
base pipeline only (adapters resolve through the registry: see test_images_stack.py). Reference: diffusers."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from image_helpers import PROMPT, diffusers_images
from serve_helpers import InProcessBackend

KEY = "images-key"


def _client_run(app, fn):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key=KEY, http_client=http, max_retries=0)
            return await fn(client)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def image_app(tiny_sd):
    from peftray.serve import openai_api
    from peftray.serve.image_replica import ImageEngine
    from peftray.serve.serve_spec import ServeConfig

    # only `sd-only` may be served besides the base: other names are refused without asking a registry
    spec = ServeConfig(name="imgs", base_model=str(tiny_sd), model_id="tiny-sd", task="text_to_image",
                       adapters=["sd-only"], torch_threads=1, api_key=KEY)
    replica = ImageEngine.func_or_class(spec.model_dump())
    try:
        yield openai_api.make_app(lambda: InProcessBackend(replica, spec, KEY))
    finally:
        replica.engine.close()


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def test_openai_client_generates_pngs_equal_to_diffusers(image_app, tiny_sd):
    async def fn(c):
        first = await c.images.generate(model="tiny-sd", prompt=PROMPT, size="32x32", response_format="b64_json",
                                        n=2, extra_body={"seed": 1, "num_inference_steps": 4})
        again = await c.images.generate(model="tiny-sd", prompt=PROMPT, n=2, extra_body={
            "seed": 1, "num_inference_steps": 4})
        other = await c.images.generate(model="tiny-sd", prompt=PROMPT, extra_body={
            "seed": 2, "num_inference_steps": 4, "guidance_scale": 3.0, "negative_prompt": "blue"})
        return first, again, other

    first, again, other = _client_run(image_app, fn)
    assert first.created > 0 and len(first.data) == 2 and first.data[0].revised_prompt is None
    got = [_pixels(d.b64_json) for d in first.data]
    want = [np.asarray(im).astype(int) for im in diffusers_images(tiny_sd, None, seed=1, n=2, output_type="pil")]
    for g, w in zip(got, want):
        assert g.shape == (32, 32, 3) and np.abs(g - w).max() <= 1  # fp32 differences may round a pixel apart
    assert [d.b64_json for d in again.data] == [d.b64_json for d in first.data]  # the same seed, the same PNGs
    ref = diffusers_images(tiny_sd, None, seed=2, guidance=3.0, negative="blue", output_type="pil")[0]
    assert np.abs(_pixels(other.data[0].b64_json) - np.asarray(ref).astype(int)).max() <= 1


@pytest.mark.parametrize("fields, status, param", [
    ({"size": "64x64"}, 400, "size"),
    ({"size": "square"}, 400, "size"),
    ({"n": 11}, 400, "n"),
    ({"n": 0}, 400, "n"),
    ({"response_format": "url"}, 400, "response_format"),
    ({"model": "nobody@production"}, 404, "model"),
    ({"quality": "hd"}, 400, "quality"),
])
def test_bad_requests_get_openai_errors_naming_the_field(image_app, fields, status, param):
    async def fn(c):
        body = {"model": "tiny-sd", "prompt": PROMPT, "extra_body": {"num_inference_steps": 1}}
        extra = {k: v for k, v in fields.items() if k in ("quality",)}
        body["extra_body"].update(extra)
        kwargs = {k: v for k, v in fields.items() if k not in extra}
        try:
            await c.images.generate(**{**body, **kwargs})
        except openai.APIStatusError as exc:
            return exc
        return None

    exc = _client_run(image_app, fn)
    assert exc is not None and exc.status_code == status, exc
    assert exc.body["param"] == param and exc.body["type"] == "invalid_request_error"
    assert f"`{param}`" in exc.body["message"] or param in exc.body["message"]


def test_text_routes_and_image_route_refuse_the_other_task(image_app, tiny_model):
    from peftray.serve import openai_api
    from peftray.serve.serve_spec import ServeConfig

    text_spec = ServeConfig(name="txt", base_model=str(tiny_model), model_id="tiny", api_key=KEY)
    text_app = openai_api.make_app(lambda: InProcessBackend(None, text_spec, KEY))

    async def on_images(c):
        with pytest.raises(openai.BadRequestError) as info:
            await c.completions.create(model="tiny-sd", prompt="hi", max_tokens=2)
        return info.value

    async def on_text(c):
        with pytest.raises(openai.BadRequestError) as info:
            await c.images.generate(model="tiny", prompt=PROMPT)
        return info.value

    for exc in (_client_run(image_app, on_images), _client_run(text_app, on_text)):
        assert exc.body["param"] == "model" and "`model`" in exc.body["message"]


def test_resolver_refuses_an_adapter_of_the_other_task_before_fetching_it(tiny_sd, tiny_model):
    from peftray.errors import ConfigError
    from peftray.registry.types import TAG_TASK_TYPE, AdapterVersion
    from peftray.serve.serve_spec import ServeConfig
    from peftray.serve.watch import ModelResolver, adapter_task

    def version(name, base, files, tags):
        return AdapterVersion(name=name, version=1, source="", run_id=None, base_model=base, base_revision=None,
                              method="lora", rank=4, target_modules=[], metrics={}, tags=tags, aliases=[],
                              files=files)

    unet = version("u", str(tiny_sd), {"adapter_model.safetensors": "0", "pytorch_lora_weights.safetensors": "1"}, {})
    text = version("t", str(tiny_sd), {"adapter_model.safetensors": "0"}, {TAG_TASK_TYPE: "CAUSAL_LM"})
    plain = version("p", str(tiny_sd), {"adapter_model.safetensors": "0"}, {})
    assert [adapter_task(v) for v in (unet, text, plain)] == ["text_to_image", "causal_lm", None]
    images = ModelResolver(ServeConfig(base_model=str(tiny_sd), task="text_to_image"))
    assert images._target("u@production", unet).key == "u/1" and images._target("p/1", plain).key == "p/1"
    with pytest.raises(ConfigError, match="causal_lm adapter") as info:
        images._target("t@production", text)
    assert info.value.param == "model"
    texts = ModelResolver(ServeConfig(base_model=str(tiny_sd)))  # same base name, so only the task differs
    with pytest.raises(ConfigError, match="text_to_image adapter"):
        texts._target("u/1", unet)
