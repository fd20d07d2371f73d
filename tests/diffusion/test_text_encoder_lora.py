"""text_to_image with `adapter.text_encoder_target_modules`: a LoRA on the CLIP text encoder trained with the UNet's.

Reference outputs come from diffusers' own loading of the saved folder (`pipeline.load_lora_weights`).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from peftray.errors import ConfigError
from peftray.jobspec import load_spec
from peftray.train.local import build_local
from peftray.train.loop import LoopContext, evaluate, train_step

TE_TARGETS = "adapter.text_encoder_target_modules=[q_proj, k_proj, v_proj, out_proj]"


@pytest.fixture(scope="module")
def trained(tiny_sd):
    """15 steps of LoRA on the UNet and the text encoder (one CPU thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = load_spec("jobs/tiny-sd-lora.yaml", [f"base_model.path={tiny_sd}", "training.max_steps=15", TE_TARGETS])
    ctx = LoopContext(rank=0, world_size=1, device=torch.device("cpu"), report=lambda m, f: None,
                      resume_from=lambda: contextlib.nullcontext(None))
    try:
        job = build_local(spec)
        start = evaluate(job, ctx)["eval_loss"]
        for step in range(job.total):
            train_step(job, ctx, step)
    finally:
        torch.set_num_threads(threads)  # never leaks into later tests, also when training fails
    return job, ctx, start


def _te_lora(model, part: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.text_encoder.named_parameters() if f"lora_{part}" in n}


@pytest.mark.slow
def test_text_encoder_lora_trains_with_the_unet(trained):
    job, ctx, start = trained
    assert job.model.adapts_text_encoder
    b = _te_lora(job.model, "B")
    assert len(b) == 2 * 4  # 2 CLIP layers x q/k/v/out
    assert all(p.requires_grad for p in b.values())
    assert min(float(p.detach().abs().max()) for p in b.values()) > 0  # every text-encoder B moved off its zero init
    trainable = {id(p) for p in job.model.parameters() if p.requires_grad}
    assert all(id(p) in trainable for p in b.values())
    assert evaluate(job, ctx)["eval_loss"] < 0.9 * start


def _ids(tokenizer):
    return tokenizer(["a red square", "a blue circle on green"], padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length, return_tensors="pt").input_ids


@pytest.mark.slow
def test_saved_folder_loads_in_diffusers_with_the_same_outputs(trained, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from peftray.train.diffusion import load_adapters

    job = trained[0]
    job.model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "text_encoder" / "adapter_config.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    ids = _ids(pipe.tokenizer)
    with torch.no_grad():
        base_text = pipe.text_encoder(ids)[0]
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    unet, text_encoder = load_adapters(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval(),
                                       CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").eval(),
                                       tmp_path / "adapter")
    with torch.no_grad():
        theirs_text, ours_text = pipe.text_encoder(ids)[0], text_encoder(ids)[0]
        assert (theirs_text - base_text).abs().max() > 1e-3  # the text-encoder LoRA took effect in diffusers
        torch.testing.assert_close(ours_text, theirs_text, atol=1e-5, rtol=1e-4)
        sample = torch.randn(2, 4, unet.config.sample_size, unet.config.sample_size,
                             generator=torch.Generator().manual_seed(1))
        t = torch.tensor([10, 500])
        theirs = pipe.unet(sample, t, encoder_hidden_states=theirs_text).sample
        ours = unet(sample, t, encoder_hidden_states=ours_text).sample
        plain = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")(
            sample, t, encoder_hidden_states=theirs_text).sample
    assert (theirs - plain).abs().max() > 1e-3  # the UNet LoRA took effect too
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def _text_spec(**adapter) -> dict:
    return {"name": "t", "base_model": "gpt2", "task": "causal_lm", "adapter": adapter,
            "dataset": {"source": "rows.jsonl", "format": "text"}}


def test_spec_refuses_text_encoder_targets_outside_text_to_image():
    with pytest.raises(ConfigError, match=r"adapter\.text_encoder_target_modules.*task 'causal_lm'"):
        load_spec(_text_spec(method="lora", text_encoder_target_modules=["q_proj"]))


def test_spec_refuses_text_encoder_targets_on_a_non_lora_method():
    with pytest.raises(ConfigError, match=r"adapter\.text_encoder_target_modules.*adapter\.method: ia3"):
        load_spec("jobs/tiny-sd-lora.yaml", ["adapter={method: ia3, target_modules: [to_k, to_v]}", TE_TARGETS])


def test_text_encoder_targets_change_the_fingerprint_and_stay_out_of_the_unet_config():
    plain = load_spec("jobs/tiny-sd-lora.yaml")
    with_te = load_spec("jobs/tiny-sd-lora.yaml", [TE_TARGETS])
    assert with_te.fingerprint() != plain.fingerprint()
    assert "text_encoder_target_modules" not in plain.model_dump(mode="json", exclude_none=True)["adapter"]
    assert "text_encoder_target_modules" not in with_te.peft_kwargs()
    assert load_spec("jobs/tiny-sd-lora.yaml", ["adapter.method=dora", TE_TARGETS]).text_encoder_targets == [
        "q_proj", "k_proj", "v_proj", "out_proj"]


def test_text_encoder_targets_that_match_nothing_are_refused_by_their_field(tiny_sd):
    from transformers import CLIPTextModel

    from peftray.train.model import wrap_text_encoder

    spec = load_spec("jobs/tiny-sd-lora.yaml", [f"base_model.path={tiny_sd}",
                                                "adapter.text_encoder_target_modules=[to_q]"])
    with pytest.raises(ConfigError, match=r"adapter\.text_encoder_target_modules.*matched no module"):
        wrap_text_encoder(spec, CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"), str(tiny_sd))
