"""text_to_image training and adapter interop with diffusers and HF PEFT (both directions), on the tiny pipeline.

Reference outputs come from diffusers' own LoRA loading (`pipeline.load_lora_weights`) and HF PEFT's wrapping.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from peftray import PeftModel
from peftray.jobspec import load_spec
from peftray.train.local import build_local
from peftray.train.loop import LoopContext, evaluate, train_step

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def trained(tiny_sd):
    """The loop's job after 25 steps of LoRA on the shipped shapes (one CPU thread: steps of ~0.1-0.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = load_spec("jobs/tiny-sd-lora.yaml", [f"base_model.path={tiny_sd}", "training.max_steps=25"])
    ctx = LoopContext(rank=0, world_size=1, device=torch.device("cpu"), report=lambda m, f: None,
                      resume_from=lambda: contextlib.nullcontext(None))
    job = build_local(spec)
    with job.model.disable_adapter():
        base = evaluate(job, ctx)["eval_loss"]
    start = evaluate(job, ctx)["eval_loss"]
    for step in range(job.total):
        train_step(job, ctx, step)
    torch.set_num_threads(threads)
    return job, ctx, base, start


@pytest.mark.slow
def test_training_lowers_eval_loss_below_the_base(trained):
    job, ctx, base, start = trained
    assert start == pytest.approx(base)  # LoRA B starts at zero: the untrained adapter is the base
    after = evaluate(job, ctx)["eval_loss"]
    assert after < 0.9 * base, (base, after)
    with job.model.disable_adapter():
        assert evaluate(job, ctx)["eval_loss"] == pytest.approx(base)  # the frozen base did not move


def _inputs(unet):
    gen = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    return (torch.randn(2, 4, size, size, generator=gen), torch.tensor([10, 500]),
            torch.randn(2, 5, unet.config.cross_attention_dim, generator=gen))


def _out(unet, inputs):
    sample, t, hidden = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=hidden).sample


def _fresh_unet(tiny_sd):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()


@pytest.mark.slow
def test_trained_adapter_loads_in_diffusers_with_the_same_unet_outputs(trained, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    job = trained[0]
    job.model.save_pretrained(tmp_path / "adapter")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    inputs = _inputs(pipe.unet)
    base = _out(pipe.unet, inputs)
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    theirs = _out(pipe.unet, inputs)
    ours = _out(PeftModel.from_pretrained(_fresh_unet(tiny_sd), str(tmp_path / "adapter")), inputs)
    assert (theirs - base).abs().max() > 1e-3  # the LoRA took effect in diffusers
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_diffusers_lora_loads_in_peftray(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    inputs = _inputs(pipe.unet)
    base = _out(pipe.unet, inputs)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    pipe.unet.add_adapter(config)
    theirs = _out(pipe.unet, inputs)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "with-meta", unet_lora_layers=get_peft_model_state_dict(
        pipe.unet), unet_lora_adapter_metadata=config.to_dict())
    ours = _out(PeftModel.from_pretrained(_fresh_unet(tiny_sd), str(tmp_path / "with-meta")), inputs)
    assert (theirs - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_hf_peft_unet_folder_loads_in_peftray_and_back(tiny_sd, tmp_path):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    reference = peft.get_peft_model(_fresh_unet(tiny_sd), config).eval()
    inputs = _inputs(reference.get_base_model())
    reference.save_pretrained(tmp_path / "hf")
    ours = PeftModel.from_pretrained(_fresh_unet(tiny_sd), str(tmp_path / "hf"))
    torch.testing.assert_close(_out(ours, inputs), _out(reference, inputs), atol=1e-5, rtol=1e-4)
    ours.save_pretrained(tmp_path / "back")
    again = peft.PeftModel.from_pretrained(_fresh_unet(tiny_sd), str(tmp_path / "back")).eval()
    torch.testing.assert_close(_out(again, inputs), _out(reference, inputs), atol=1e-5, rtol=1e-4)


def test_v_prediction_targets_the_velocity(tiny_sd):
    """With a v_prediction scheduler the loss regresses on scheduler.get_velocity (checked by recomputing it)."""
    spec = load_spec("jobs/tiny-sd-lora.yaml", [f"base_model.path={tiny_sd}", "training.snr_gamma=null"])
    job = build_local(spec)
    model = job.model.eval()
    model.scheduler.register_to_config(prediction_type="v_prediction")
    example = job.data.eval[0]
    latents, ids = example["latents"][None], torch.tensor([example["input_ids"]])
    seeds = torch.tensor([example["seed"]])
    gen = torch.Generator().manual_seed(example["seed"])
    noise = torch.randn(latents.shape[1:], generator=gen)[None]
    t = torch.randint(0, 1000, (1,), generator=gen)
    with torch.no_grad():
        hidden = model.text_encoder(ids)[0]
        pred = model.unet(model.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
        expected = ((pred - model.scheduler.get_velocity(latents, noise, t)) ** 2).mean()
        assert float(model(latents, ids, seeds)) == pytest.approx(float(expected), rel=1e-5)
        model.snr_gamma = 5.0
        from diffusers.training_utils import compute_snr

        snr = compute_snr(model.scheduler, t)
        weight = torch.clamp(snr, max=5.0) / (snr + 1)
        assert float(model(latents, ids, seeds)) == pytest.approx(float(expected * weight), rel=1e-5)
