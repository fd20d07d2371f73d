"""The classification engine in one process, without Ray: an adapter's logits equal HF PEFT's (MiniLM seq_cls)
and the trained adapter's own forward (tiny ViT image_cls); a mixed batch of several adapters and the base runs
in ONE forward and gives each row the logits of its request alone; inputs and adapters of the other task, or of
another head, are refused naming the field."""

from __future__ import annotations

import pytest
import torch

from classify_helpers import (
    LABELS, TEXTS, colour_images, hf_image_logits, hf_text_logits, make_seq_cls_lora, make_vit_lora, minilm_base,
    png_b64,
)
from peftray.errors import AdapterFormatError, ConfigError


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _engine(task: str, base, labels=None):
    from peftray.serve.classify_replica import load_classify_engine
    from peftray.serve.serve_spec import ServeConfig

    spec = ServeConfig(base_model=str(base), task=task, labels=labels, max_batch_size=16, max_adapters_per_replica=3)
    return load_classify_engine(spec)


@pytest.fixture(scope="module")
def text_engine(minilm_model, one_thread):
    eng = _engine("seq_cls", minilm_model, LABELS)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def image_engine(tiny_vit, one_thread):
    eng = _engine("image_cls", tiny_vit)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def text_adapters(minilm_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("seq-cls-loras")
    return [make_seq_cls_lora(minilm_model, root / "a0", seed=1),
            make_seq_cls_lora(minilm_model, root / "a1", seed=2, dora=True)]


@pytest.fixture(scope="module")
def trained_vit(tiny_vit, tmp_path_factory, one_thread):
    """The shipped tiny-vit-lora spec trained in this process (about a second): its adapter folder."""
    from peftray.jobspec import load_spec
    from peftray.train.local import run_local

    run = run_local(load_spec("jobs/tiny-vit-lora.yaml", [f"base_model.path={tiny_vit}"]),
                    checkpoint_dir=tmp_path_factory.mktemp("vit-run"))
    return run.last_checkpoint / "adapter"


@pytest.fixture(scope="module")
def image_adapters(tiny_vit, trained_vit, tmp_path_factory):
    return [trained_vit, make_vit_lora(tiny_vit, tmp_path_factory.mktemp("vit-lora") / "a1", seed=5)]


def test_seq_cls_logits_equal_hf_peft_and_the_base(text_engine, text_adapters, minilm_model):
    assert text_engine.labels == LABELS
    for i, folder in enumerate(text_adapters):
        ours = text_engine.classify(TEXTS, text_engine.slots.acquire(f"a{i}", folder))
        torch.testing.assert_close(ours, hf_text_logits(minilm_model, folder, TEXTS), atol=1e-5, rtol=1e-5)
    base = text_engine.classify(TEXTS)
    torch.testing.assert_close(base, hf_text_logits(minilm_model, None, TEXTS), atol=1e-5, rtol=1e-5)
    assert (base - ours).abs().max() > 0.1  # the adapter (and its head) change the answers


def test_image_cls_logits_equal_the_trained_adapters_own_forward_and_hf_peft(image_engine, image_adapters, tiny_vit):
    labelled = colour_images()
    images = [b for _, b in labelled] + [png_b64(1)]
    ours = image_engine.classify(images, image_engine.slots.acquire("trained", image_adapters[0]))
    own = hf_image_logits(tiny_vit, image_adapters[0], images, peftray_model=True)
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, hf_image_logits(tiny_vit, image_adapters[0], images), atol=1e-5, rtol=1e-5)
    results = image_engine.results(ours[:len(labelled)])
    right = sum(r["label"] == label for r, (label, _) in zip(results, labelled))
    assert right >= len(labelled) - 1, results  # it learned the colours (held-out accuracy >= 0.9 in training)
    torch.testing.assert_close(image_engine.classify(images), hf_image_logits(tiny_vit, None, images),
                               atol=1e-5, rtol=1e-5)


def _mixed_equals_alone(engine, requests, slot):
    alone = [engine.classify(inputs, slot(key)) for inputs, key in requests]
    steps = engine.steps
    mixed = engine.classify_many([(inputs, slot(key)) for inputs, key in requests])
    assert engine.steps - steps == 1 and engine.forward_rows[-1] == sum(len(i) for i, _ in requests)
    for a, m in zip(alone, mixed):
        torch.testing.assert_close(m, a, atol=1e-5, rtol=1e-5)
    return mixed


def test_seq_cls_mixed_batch_equals_each_request_alone_in_one_forward(text_engine, text_adapters):
    requests = [(TEXTS[:2], "a0"), (TEXTS[1:], "a1"), (TEXTS[2:3], None), (["short", TEXTS[2]], "a0")]
    mixed = _mixed_equals_alone(text_engine, requests,
                                lambda k: text_engine.slots.acquire(k, text_adapters[int(k[1])]) if k else None)
    assert (mixed[0][1] - mixed[1][0]).abs().max() > 0.05  # the same text, two adapters, two answers


def test_image_cls_mixed_batch_equals_each_request_alone_in_one_forward(image_engine, image_adapters):
    images = [png_b64(s) for s in range(4)]
    requests = [(images[:2], "a0"), (images[1:], "a1"), (images[:1], None), (images[3:], "a0")]
    mixed = _mixed_equals_alone(image_engine, requests,
                                lambda k: image_engine.slots.acquire(k, image_adapters[int(k[1])]) if k else None)
    assert (mixed[0][1] - mixed[1][0]).abs().max() > 0.05


def test_a_request_larger_than_a_batch_spans_forwards_and_keeps_its_order(text_engine, text_adapters):
    slot = text_engine.slots.acquire("a0", text_adapters[0])
    texts = [f"{TEXTS[i % 4]} {i}" for i in range(21)]  # 21 rows, max_batch_size 16
    many = text_engine.classify(texts, text_engine.slots.acquire("a0", text_adapters[0]))
    alone = torch.cat([text_engine.classify([t], slot) for t in texts[15:18]])
    torch.testing.assert_close(many[15:18], alone, atol=1e-5, rtol=1e-5)
    assert text_engine.forward_rows[-5:-3] == [16, 5] and slot.pins == 0


def test_results_are_probabilities_best_first_with_top_k(text_engine):
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    first, second = text_engine.results(logits, top_k=1)
    assert first["label"] == "positive" and first["index"] == 0 and len(first["scores"]) == 1
    assert abs(first["score"] - float(torch.tensor([0.0, 2.0]).softmax(0)[1])) < 1e-6
    assert second["label"] == "negative" and second["index"] == 1
    full = text_engine.results(logits)[0]["scores"]
    assert [s["label"] for s in full] == ["positive", "negative"] and abs(sum(s["score"] for s in full) - 1) < 1e-6


@pytest.mark.parametrize("engine_name, value, needle", [
    ("text_engine", "data:image/png;base64,iVBORw0KGgo=", "classifies text"),
    ("text_engine", png_b64(0), "classifies text"),
    ("text_engine", "  ", "is empty"),
    ("text_engine", "word " * 600, r"has 60\d tokens but this model reads at most \d+"),
    ("image_engine", "a photo of a red circle", "not base64 image data"),
    ("image_engine", "aGVsbG8gd29ybGQ=", "not an image Pillow can decode"),  # base64 of "hello world"
    ("image_engine", "data:image/png,rawbytes", "without `;base64,`"),
    ("image_engine", "data:image/png;base64,@@@", "not base64 image data"),
])
def test_inputs_of_the_other_task_or_undecodable_are_refused_naming_input(request, engine_name, value, needle):
    engine = request.getfixturevalue(engine_name)
    with pytest.raises(ConfigError, match=needle) as info:
        engine.encode(["fine", value] if engine_name == "text_engine" else [png_b64(0), value])
    assert info.value.param == "input" and "`input[1]`" in str(info.value)


def test_adapters_of_another_task_or_head_are_refused_naming_model(text_engine, image_engine, image_adapters,
                                                                   text_adapters, minilm_model, tiny_model, tmp_path):
    from serve_helpers import make_lora

    cases = [(text_engine, image_adapters[1], "has no task_type"),
             (text_engine, make_lora(tiny_model, tmp_path / "llama", seed=1), "has no task_type"),
             (text_engine, make_seq_cls_lora(minilm_model, tmp_path / "three", seed=3, num_labels=3),
              r"`classifier\.(weight|bias)` of shape \(3,.*\(2 labels: negative, positive\)"),
             (image_engine, text_adapters[0], "task_type SEQ_CLS")]
    for engine, folder, needle in cases:
        with pytest.raises(AdapterFormatError, match=needle) as info:
            engine.slots.acquire(f"wrong-{folder.name}", folder)
        assert "the request's `model`" in str(info.value) and f"wrong-{folder.name}" not in engine.loaded_adapters()


def test_the_resolver_tells_the_task_of_a_registered_version(minilm_model, tiny_vit):
    import json

    from peftray.registry.types import TAG_ADAPTER_CONFIG, TAG_TASK_TYPE, AdapterVersion
    from peftray.serve.serve_spec import ServeConfig
    from peftray.serve.watch import ModelResolver, adapter_task

    def version(name, base, tags):
        return AdapterVersion(name=name, version=1, source="", run_id=None, base_model=str(base), base_revision=None,
                              method="lora", rank=4, target_modules=[], metrics={}, tags=tags, aliases=[],
                              files={"adapter_model.safetensors": "0"})

    text = version("s", minilm_model, {TAG_TASK_TYPE: "SEQ_CLS"})
    image = version("i", tiny_vit, {TAG_ADAPTER_CONFIG: json.dumps({"modules_to_save": ["classifier"]})})
    plain = version("p", tiny_vit, {TAG_ADAPTER_CONFIG: json.dumps({"modules_to_save": None})})
    assert [adapter_task(v) for v in (text, image, plain)] == ["seq_cls", "image_cls", None]
    images = ModelResolver(ServeConfig(base_model=str(tiny_vit), task="image_cls"))
    assert images._target("i/1", image).key == "i/1" and images._target("p/1", plain).key == "p/1"
    texts = ModelResolver(ServeConfig(base_model=str(minilm_model), task="seq_cls"))
    assert texts._target("s/1", text).key == "s/1"
    with pytest.raises(ConfigError, match="is a seq_cls adapter") as info:
        ModelResolver(ServeConfig(base_model=str(minilm_model)))._target("s/1", text)  # a causal_lm deployment
    assert info.value.param == "model"
