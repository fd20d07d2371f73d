"""The deployed text_to_image Serve app on the session stack, through the `openai` client: registered UNet
adapters by alias and version, requested at once, give diffusers' images; a text adapter is refused."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import uuid

import numpy as np
import openai
import pytest
from PIL import Image

from image_helpers import PROMPT, diffusers_images, make_unet_lora
from serve_helpers import make_lora

pytestmark = pytest.mark.slow


def test_image_app_serves_registered_adapters_batched_and_refuses_a_text_adapter(stack, ray_session, tiny_sd,
                                                                                  tiny_model, tmp_path):
    from peftray.registry import promote, register_adapter
    from peftray.serve import ServeConfig, deploy, down

    tag = uuid.uuid4().hex[:6]
    folders = [make_unet_lora(tiny_sd, tmp_path / f"sd{i}", seed=40 + i) for i in range(2)]
    names = [f"img{tag}-{i}" for i in range(2)]
    for folder, name in zip(folders, names):
        register_adapter(folder, name)
    promote(names[0], 1, "production")
    text = f"img{tag}-text"
    register_adapter(make_lora(tiny_model, tmp_path / "text", seed=3), text, base_model=str(tiny_sd))
    spec = ServeConfig(name=f"img{tag}", task="text_to_image", base_model=str(tiny_sd), model_id="tiny-sd",
                       max_batch_size=8, num_cpus=0, torch_threads=1, request_timeout_s=120,
                       api_key="img-key-" + tag)
    dep = deploy(spec, wait_s=240)
    try:
        client = openai.OpenAI(base_url=dep.url + "/v1", api_key=dep.api_key, max_retries=0, timeout=120)
        models = [f"{names[0]}@production", f"{names[1]}/1", "tiny-sd"]

        def generate(model):
            out = client.images.generate(model=model, prompt=PROMPT, size="32x32", response_format="b64_json",
                                         extra_body={"seed": 1, "num_inference_steps": 4})
            return np.asarray(Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json)))).astype(int)

        with cf.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(generate, models))
        for image, folder in zip(got, folders + [None]):
            want = np.asarray(diffusers_images(tiny_sd, folder, seed=1, steps=4, output_type="pil")[0]).astype(int)
            assert np.abs(image - want).max() <= 1
        assert np.abs(got[0] - got[2]).max() > 10 and np.abs(got[0] - got[1]).max() > 10
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(model=f"{text}@latest", prompt=PROMPT, extra_body={"num_inference_steps": 1})
        assert info.value.body["param"] == "model" and text in info.value.body["message"]
    finally:
        down(spec.name)
