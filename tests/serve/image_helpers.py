"""Shared helpers of the image-serving tests: UNet LoRA adapters with distinct random weights, and diffusers'
own pipeline (with `load_lora_weights`) as the reference."""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPT = "a red circle on a white background"


def make_unet_lora(tiny_sd: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A UNet LoRA folder (HF PEFT files + diffusers' pytorch_lora_weights.safetensors, as training writes),
    A and B random (seeded) and strong enough that each adapter draws its own images."""
    from diffusers import UNet2DConditionModel

    import peftray
    from peftray.adapters.io import write_diffusers_lora

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    model = peftray.get_peft_model(unet, peftray.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                            init_lora_weights=False,
                                                            base_model_name_or_path=str(tiny_sd)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    write_diffusers_lora(out, model.peft_config["default"], model.get_adapter_state_dict("default"))
    return out


def make_te_lora(tiny_sd: Path, out: Path, seed: int) -> Path:
    """A text_to_image adapter folder with a text-encoder half (`text_encoder/`, and `text_encoder.` tensors in
    pytorch_lora_weights.safetensors), as a job with adapter.text_encoder_target_modules saves it; random B."""
    from peftray.jobspec import load_spec
    from peftray.train.local import build_local

    repo = Path(__file__).resolve().parents[2]
    spec = load_spec(repo / "jobs" / "tiny-sd-lora.yaml", [f"base_model.path={tiny_sd}", "training.max_steps=1",
                     "adapter.text_encoder_target_modules=[q_proj, k_proj, v_proj, out_proj]"])
    model = build_local(spec).model
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


def diffusers_images(tiny_sd: Path, adapter: Path | None, prompt: str = PROMPT, *, seed: int, steps: int = 4,
                     guidance: float = 7.5, n: int = 1, negative: str | None = None, output_type: str = "np"):
    """What diffusers' StableDiffusionPipeline makes, after `load_lora_weights(adapter)` when one is given."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n,
               negative_prompt=negative, generator=torch.Generator().manual_seed(seed), output_type=output_type)
    return out.images
