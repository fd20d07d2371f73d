"""The text-to-image engine in one process, without Ray: images through an adapter equal diffusers' after
`load_lora_weights`, a mixed batch (two adapters + the base) equals each request alone and runs ONE UNet call
per denoising step, and what does not fit is refused naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from image_helpers import PROMPT, diffusers_images, make_te_lora, make_unet_lora
from peftray.errors import AdapterFormatError, ConfigError

STEPS = 4


@pytest.fixture(scope="module")
def engine(tiny_sd):
    from peftray.serve.diffusion import DiffusionEngine, load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = DiffusionEngine(load_pipeline(str(tiny_sd), "cpu", torch.float32), max_batch_size=12, max_adapters=3)
    try:
        yield eng
    finally:
        eng.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapters(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("unet-loras")
    return [make_unet_lora(tiny_sd, root / f"a{i}", seed=20 + i) for i in range(2)]


def _params(seed: int, n: int = 1, guidance: float = 7.5, negative=None):
    from peftray.serve.diffusion import ImageParams

    return ImageParams(prompt=PROMPT, width=32, height=32, n=n, steps=STEPS, guidance_scale=guidance,
                       negative_prompt=negative, seed=seed)


def test_adapter_images_equal_diffusers_after_load_lora_weights(engine, adapters, tiny_sd):
    slot = engine.slots.acquire("a0", adapters[0])
    ours = engine.generate(_params(seed=3, n=2), slot)
    base = engine.generate(_params(seed=3, n=2))
    assert ours.shape == (2, 32, 32, 3)
    assert np.abs(ours - base).max() > 0.05  # the adapter changes the images
    np.testing.assert_allclose(ours, diffusers_images(tiny_sd, adapters[0], seed=3, steps=STEPS, n=2), atol=1e-4)
    np.testing.assert_allclose(base, diffusers_images(tiny_sd, None, seed=3, steps=STEPS, n=2), atol=1e-4)
    unguided = engine.generate(_params(seed=5, guidance=1.0, negative="blue"), engine.slots.acquire("a0", adapters[0]))
    np.testing.assert_allclose(unguided, diffusers_images(tiny_sd, adapters[0], seed=5, steps=STEPS, guidance=1.0,
                                                          negative="blue"), atol=1e-4)


def test_mixed_batch_equals_each_request_alone_in_one_unet_call_per_step(engine, adapters):
    requests = [(_params(seed=7), "a0"), (_params(seed=8, negative="green"), "a1"), (_params(seed=9, n=2), None),
                (_params(seed=7, guidance=1.0), "a1")]

    def slot(key):
        return engine.slots.acquire(key, adapters[int(key[1])]) if key else None

    alone = [engine.generate(p, slot(k)) for p, k in requests]
    before = engine.steps
    mixed = engine.generate_many([(p, slot(k)) for p, k in requests])
    rows = 2 + 2 + 4 + 1  # classifier-free guidance doubles a request's rows
    assert engine.unet_rows[-STEPS:] == [rows] * STEPS and engine.steps - before == STEPS
    for a, m in zip(alone, mixed):
        np.testing.assert_allclose(m, a, atol=1e-5)
    assert np.abs(mixed[0] - mixed[3]).max() > 0.05 and np.abs(mixed[0] - alone[1]).max() > 0.05


def test_what_does_not_fit_is_refused_naming_the_field(engine, tiny_model, tmp_path):
    from serve_helpers import make_lora

    text = make_lora(tiny_model, tmp_path / "text-lora", seed=1)
    with pytest.raises(AdapterFormatError, match="`model`"):
        engine.slots.acquire("text-lora", text)
    assert "text-lora" not in engine.loaded_adapters()
    for size in ("64x64", "32x30", "big"):
        with pytest.raises(ConfigError, match="`size`") as info:
            engine.parse_size(size)
        assert info.value.param == "size"
    assert engine.parse_size(None) == (32, 32)
    with pytest.raises(ConfigError, match="`n`"):
        engine.submit(_params(seed=1, n=7), None, lambda images, error: None)  # 14 rows > max_batch_size 12


def test_a_cancelled_request_frees_its_slot(engine, adapters):
    import threading

    slot = engine.slots.acquire("a1", adapters[1])
    ended = threading.Event()
    with engine._cv:  # queued and cancelled before the loop takes it
        engine.cancel(engine.submit(_params(seed=1), slot, lambda images, error: ended.set()))
    assert ended.wait(60) and slot.pins == 0


def test_a_unet_adapter_is_refused_by_the_text_engine(adapters, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftray.serve.engine import GenerationEngine

    text = GenerationEngine(AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model))
    try:
        with pytest.raises(AdapterFormatError, match="`model`.*down_blocks|`model`.*up_blocks"):
            text.slots.acquire("unet-lora", adapters[0])
        assert text.loaded_adapters() == [] and text.peft is None
    finally:
        text.close()


def test_an_adapter_with_a_text_encoder_half_draws_what_diffusers_draws(tiny_sd, tmp_path):
    """Its prompt goes through its text-encoder LoRA, as after diffusers' `load_lora_weights(folder)` (which
    loads both halves), also beside a UNet-only adapter and the base in one batch; evicted, both halves go."""
    from peftray.serve.diffusion import DiffusionEngine, load_pipeline

    te_folder = make_te_lora(tiny_sd, tmp_path / "te", seed=7)
    unet_only = make_unet_lora(tiny_sd, tmp_path / "unet-only", seed=8)
    eng = DiffusionEngine(load_pipeline(str(tiny_sd), "cpu", torch.float32), max_batch_size=12, max_adapters=2)
    try:
        te, plain = eng.slots.acquire("te", te_folder), eng.slots.acquire("plain", unet_only)
        rows = eng.generate_many([(_params(9), te), (_params(9), plain), (_params(9), None)])
        np.testing.assert_allclose(rows[0], diffusers_images(tiny_sd, te_folder, seed=9, steps=STEPS), atol=1e-4)
        np.testing.assert_allclose(rows[1], diffusers_images(tiny_sd, unet_only, seed=9, steps=STEPS), atol=1e-4)
        np.testing.assert_allclose(rows[2], diffusers_images(tiny_sd, None, seed=9, steps=STEPS), atol=1e-4)
        for slot in (te, plain):
            eng.slots.release(slot)
        eng.slots.release(eng.slots.acquire("plain", unet_only))  # most recently used: "te" goes next
        eng.slots.acquire("other", make_unet_lora(tiny_sd, tmp_path / "other", seed=10))
        assert "te" not in eng.loaded_adapters() and eng.te_peft is not None
        np.testing.assert_allclose(eng.generate(_params(9), None), rows[2], atol=1e-5)  # no half left behind
        again = eng.slots.acquire("te", te_folder)  # loads back into the dormant text-encoder PeftModel
        np.testing.assert_allclose(eng.generate(_params(9), again), rows[0], atol=1e-5)
    finally:
        eng.close()
