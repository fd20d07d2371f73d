"""The deployed seq_cls and image_cls Serve apps on the session stack: registered adapters, requested at once by
alias, version and the base, get HF PEFT's (or the trained adapter's own) probabilities; a promotion reaches
serving without a restart; an adapter of the other task and the text routes are refused naming `model`."""

from __future__ import annotations

import concurrent.futures as cf
import time
import uuid

import httpx
import pytest
import torch

from classify_helpers import (
    LABELS, TEXTS, colour_images, hf_image_logits, hf_text_logits, make_seq_cls_lora, make_vit_lora,
)

pytestmark = pytest.mark.slow


def _classify(dep, model: str, inputs, **extra) -> httpx.Response:
    return httpx.post(f"{dep.url}/v1/classify", json={"model": model, "input": inputs, **extra},
                      headers={"Authorization": f"Bearer {dep.api_key}"}, timeout=120)


def _probs(data: list[dict], labels: list[str]) -> torch.Tensor:
    return torch.tensor([[next(s["score"] for s in d["scores"] if s["label"] == name) for name in labels]
                         for d in data])


def _at_once(dep, models: list[str], inputs) -> list[dict]:
    with cf.ThreadPoolExecutor(len(models)) as pool:
        got = list(pool.map(lambda m: _classify(dep, m, inputs), models))
    for r in got:
        assert r.status_code == 200, r.text
    return [r.json() for r in got]


def _refused(dep, model: str, inputs, param: str) -> str:
    got = _classify(dep, model, inputs)
    assert got.status_code == 400, got.text
    assert got.json()["error"]["param"] == param
    return got.json()["error"]["message"]


def _registered_app(adapters: dict, alias: str, wrong: tuple, **fields):
    """(Deployment, spec): each adapter registered (the first's version 1 promoted to `alias`), `wrong` = (name,
    folder) registered on this base although made for the other task, and a classification app deployed."""
    from peftray.registry import promote, register_adapter
    from peftray.serve import ServeConfig, deploy

    for name, folder in adapters.items():
        register_adapter(folder, name)
    promote(next(iter(adapters)), 1, alias)
    register_adapter(wrong[1], wrong[0], base_model=fields["base_model"])
    tag = uuid.uuid4().hex[:6]
    spec = ServeConfig(name=f"cls{tag}", max_batch_size=16, num_cpus=0, torch_threads=1, request_timeout_s=120,
                       api_key="cls-key-" + tag, **fields)
    return deploy(spec, wait_s=240), spec


def test_seq_cls_app_serves_registered_adapters_batched_and_follows_a_promotion(stack, ray_session, minilm_model, tiny_vit, tmp_path):
    from peftray.registry import promote, register_adapter
    from peftray.serve import down

    tag = uuid.uuid4().hex[:6]
    folders = [make_seq_cls_lora(minilm_model, tmp_path / f"s{i}", seed=60 + i) for i in range(2)]
    names, image = [f"cls{tag}-{i}" for i in range(2)], f"cls{tag}-image"
    wrong = make_vit_lora(tiny_vit, tmp_path / "vit", seed=1)
    dep, spec = _registered_app(dict(zip(names, folders)), "production", (image, wrong), task="seq_cls",
                                base_model=str(minilm_model), model_id="minilm", labels=LABELS)
    try:
        models = [f"{names[0]}@production", f"{names[1]}/1", "minilm"]
        answers = _at_once(dep, models, TEXTS)
        for body, folder in zip(answers, folders + [None]):
            want = hf_text_logits(minilm_model, folder, TEXTS).softmax(-1)
            torch.testing.assert_close(_probs(body["data"], LABELS), want, atol=1e-5, rtol=1e-5)
            assert body["usage"]["inputs"] == len(TEXTS)
        assert f"{image}@latest" in _refused(dep, f"{image}@latest", TEXTS, "model")
        assert "image" in _refused(dep, names[0] + "/1", ["data:image/png;base64,iVBORw0KGgo="], "input")
        completions = httpx.post(f"{dep.url}/v1/completions", json={"model": "minilm", "prompt": "hi"},
                                 headers={"Authorization": f"Bearer {dep.api_key}"}, timeout=60)
        assert completions.status_code == 400 and completions.json()["error"]["param"] == "model"
        metrics = httpx.get(f"{dep.url}/metrics", headers={"Authorization": f"Bearer {dep.api_key}"}).text
        assert f'peftray_requests_total{{model="{names[1]}/1",status="200"}} 1.0' in metrics
        # a promotion reaches serving without a restart: version 2 of the first name has the second's weights
        register_adapter(folders[1], names[0], metrics={"eval_loss": 1.0})
        promote(names[0], 2, "production")
        second = _probs(answers[1]["data"], LABELS)
        deadline = time.monotonic() + 120  # alias_poll_s is 2 s; the bound only stops a broken poll
        while not torch.allclose(_probs(_at_once(dep, [f"{names[0]}@production"], TEXTS)[0]["data"], LABELS),
                                 second, atol=1e-5):
            assert time.monotonic() < deadline, "the promotion did not reach serving"
            time.sleep(0.5)
    finally:
        down(spec.name)


def test_image_cls_app_serves_a_trained_and_a_made_adapter_batched(stack, ray_session, tiny_vit, minilm_model,
                                                                   tmp_path):
    from transformers import AutoConfig

    from peftray.jobspec import load_spec
    from peftray.serve import down
    from peftray.train.local import run_local

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = run_local(load_spec("jobs/tiny-vit-lora.yaml", [f"base_model.path={tiny_vit}"]),
                        checkpoint_dir=tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    folders = [run.last_checkpoint / "adapter", make_vit_lora(tiny_vit, tmp_path / "made", seed=7)]
    tag = uuid.uuid4().hex[:6]
    names, text = [f"vit{tag}-trained", f"vit{tag}-made"], f"vit{tag}-text"
    wrong = make_seq_cls_lora(minilm_model, tmp_path / "text", seed=1)
    dep, spec = _registered_app(dict(zip(names, folders)), "staging", (text, wrong), task="image_cls",
                                base_model=str(tiny_vit), model_id="tiny-vit")
    try:
        labelled = colour_images()
        images = [b for _, b in labelled]
        answers = _at_once(dep, [f"{names[0]}@staging", f"{names[1]}/1", "tiny-vit"], images)
        refs = [hf_image_logits(tiny_vit, folders[0], images, peftray_model=True),
                hf_image_logits(tiny_vit, folders[1], images), hf_image_logits(tiny_vit, None, images)]
        config = AutoConfig.from_pretrained(tiny_vit)
        labels = [config.id2label[i] for i in range(config.num_labels)]  # the base's labels, in id order
        for body, ref in zip(answers, refs):
            torch.testing.assert_close(_probs(body["data"], labels), ref.softmax(-1), atol=1e-5, rtol=1e-5)
        right = sum(d["label"] == label for d, (label, _) in zip(answers[0]["data"], labelled))
        assert right >= len(labelled) - 1  # the trained adapter knows the colours
        assert "seq_cls adapter" in _refused(dep, f"{text}@latest", images[:1], "model")
        assert "not base64 image data" in _refused(dep, names[1] + "/1", ["a red circle"], "input")
    finally:
        down(spec.name)

