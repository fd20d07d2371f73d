"""The two sections of `peftray bench images`, each arm against its baseline in the same process.

train: one LoRA training step on the pipeline's UNet (noisy latents, timesteps and text states fixed by a seed;
  MSE on the noise; AdamW), peftray's LoRA vs HF PEFT's on deep copies of the same UNet, the same LoRA config
  and the same initial LoRA weights (copied from HF PEFT's), so the losses must agree step for step. A third
  arm, `no_adapter`, is the ceiling: the same step on a copy with no adapter at all (backward to the input, so
  every activation gradient is still computed; no LoRA products, no optimizer). No LoRA implementation's step
  can be faster than it, so HF PEFT's time over it bounds the speed-up any implementation can show.
generate: `adapters` requests, each for its own adapter, denoised by peftray's engine in ONE batch (one UNet
  call per step for all of them) vs diffusers' pipeline with the adapters loaded (`load_lora_weights`) and
  `set_adapters` before each request, one request after another; the same seeds, so the images must agree.
  Its ceiling: the plain UNet (no adapter) called once per request vs once over all their rows, the same rows;
  what batching itself can save on this machine, which bounds the speed-up of any batched server.
Every timed call ends in a host copy (the loss as a float, images as numpy), so GPU timings are synchronized.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from peftray.bench._tuners_setup import (copy_lora_weights, median_ms, paired_ratio, peft_baseline,
                                         time_interleaved)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow cross", "a big red square",
           "a small blue circle", "a black cross", "a white triangle"]


# --- train ------------------------------------------------------------------------------------------------
def _train_batch(unet, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    size, dim = unet.config.sample_size, unet.config.cross_attention_dim
    return (torch.randn(batch, unet.config.in_channels, size, size, generator=gen),
            torch.randint(0, 1000, (batch,), generator=gen), torch.randn(batch, 16, dim, generator=gen),
            torch.randn(batch, unet.config.out_channels, size, size, generator=gen))


def run_train(pipe_dir: Path, *, rank: int, batch: int, seed: int, repeats: int, warmup: int,
              device: str = "cpu") -> dict:
    """Median step time of each side, the paired ratio and the largest loss difference over the steps."""
    from diffusers import UNet2DConditionModel

    import peftray

    peft = peft_baseline("images", "diffusers + Hugging Face PEFT")
    unet = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet")
    kwargs = dict(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS)
    torch.manual_seed(seed)
    hf = peft.get_peft_model(copy.deepcopy(unet), peft.LoraConfig(init_lora_weights="gaussian", **kwargs))
    ours = peftray.get_peft_model(copy.deepcopy(unet), peftray.LoraConfig(**kwargs))
    with torch.no_grad():  # a non-zero B too, so that the LoRA products are not multiplications by zero
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    copy_lora_weights(hf, ours)
    hf, ours = hf.to(device), ours.to(device)
    sample, t, hidden, noise = (x.to(device) for x in _train_batch(unet, batch, seed))
    losses: dict[str, list[float]] = {"peftray": [], "hf_peft": []}

    bare = copy.deepcopy(unet).requires_grad_(False).to(device)
    losses["no_adapter"] = []

    def stepper(model, name):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None

        def step():
            x = sample if params else sample.detach().requires_grad_(True)  # no adapter: backward to the input
            pred = model(x, t, encoder_hidden_states=hidden).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses[name].append(float(loss.detach()))
        return step

    times = time_interleaved({"peftray": stepper(ours, "peftray"), "hf_peft": stepper(hf, "hf_peft"),
                              "no_adapter": stepper(bare, "no_adapter")}, repeats, warmup)
    diff = max(abs(a - b) for a, b in zip(losses["peftray"], losses["hf_peft"]))
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    return {"peftray": {"ms": median_ms(times["peftray"])}, "hf_peft": {"ms": median_ms(times["hf_peft"])},
            "no_adapter": {"ms": median_ms(times["no_adapter"])},
            "ratio": paired_ratio(times["hf_peft"], times["peftray"]),
            "ceiling": paired_ratio(times["hf_peft"], times["no_adapter"]), "loss_max_abs_diff": diff,
            "batch": batch, "rank": rank, "trainable_params": trainable}


# --- generate ---------------------------------------------------------------------------------------------
def make_adapters(pipe_dir: Path, out: Path, count: int, rank: int, seed: int) -> list[Path]:
    """`count` UNet LoRA folders (HF PEFT files + diffusers' file) with distinct random weights."""
    from diffusers import UNet2DConditionModel

    import peftray
    from peftray.adapters.io import write_diffusers_lora

    folders = []
    for i in range(count):
        torch.manual_seed(seed + i)
        unet = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet")
        model = peftray.get_peft_model(unet, peftray.LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                                                                init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        folder = out / f"adapter{i}"
        model.save_pretrained(folder)
        write_diffusers_lora(folder, model.peft_config["default"], model.get_adapter_state_dict("default"))
        folders.append(folder)
    return folders


def run_generate(pipe_dir: Path, folders: list[Path], *, steps: int, guidance: float, seed: int, repeats: int,
                 warmup: int, device: str = "cpu") -> dict:
    """peftray's engine (one mixed batch) vs diffusers (set_adapters, one request at a time)."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from peftray.serve.diffusion import DiffusionEngine, ImageParams, load_pipeline

    peft_baseline("images", "diffusers + Hugging Face PEFT")
    names = [f"adapter{i}" for i in range(len(folders))]
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for name, folder in zip(names, folders):
        pipe.load_lora_weights(str(folder), adapter_name=name)
    pipe = pipe.to(device)
    engine = DiffusionEngine(load_pipeline(str(pipe_dir), device, torch.float32),
                             max_batch_size=2 * len(folders), max_adapters=len(folders))
    side = engine.native_size
    slots = [engine.slots.acquire(name, folder) for name, folder in zip(names, folders)]  # pinned for the run
    params = [ImageParams(prompt=PROMPTS[i % len(PROMPTS)], width=side, height=side, steps=steps,
                          guidance_scale=guidance, seed=seed + i) for i in range(len(folders))]
    out: dict[str, list] = {}

    def peftray_batch():
        out["peftray"] = engine.generate_many(list(zip(params, slots)))

    def diffusers_serial():
        images = []
        for name, p in zip(names, params):
            pipe.set_adapters(name)
            images.append(pipe(p.prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                               generator=torch.Generator().manual_seed(p.seed)).images)
        out["diffusers"] = images

    unet_serial, unet_batched = _unet_ceiling(pipe_dir, pipe, len(folders), side, guidance, seed, device)

    try:
        with torch.inference_mode():
            times = time_interleaved({"peftray": peftray_batch, "diffusers": diffusers_serial,
                                      "unet_serial": unet_serial, "unet_batched": unet_batched}, repeats, warmup)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(out["peftray"], out["diffusers"]))
        unet_calls = engine.unet_rows[-steps:]
    finally:
        engine.close()
    n = len(folders)
    return {"peftray": {"ms": median_ms(times["peftray"]), "images_per_s": n / (median_ms(times["peftray"]) / 1e3)},
            "diffusers": {"ms": median_ms(times["diffusers"]),
                          "images_per_s": n / (median_ms(times["diffusers"]) / 1e3)},
            "ratio": paired_ratio(times["diffusers"], times["peftray"]), "image_max_abs_diff": diff,
            "unet_serial": {"ms": median_ms(times["unet_serial"])},
            "unet_batched": {"ms": median_ms(times["unet_batched"])},
            "ceiling": paired_ratio(times["unet_serial"], times["unet_batched"]), "requests": n, "steps": steps,
            "size": f"{side}x{side}", "unet_rows_per_step": unet_calls}


def _unet_ceiling(pipe_dir: Path, pipe, requests: int, side: int, guidance: float, seed: int, device: str):
    """The ceiling arms of `generate`: the plain UNet over the requests' rows, one call per request and one call
    for all, on the same random latents and text states."""
    from diffusers import UNet2DConditionModel

    bare = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet").to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    rows = 2 if guidance > 1 else 1  # classifier-free guidance: two UNet rows per image
    cfg = bare.config
    latent = side // int(pipe.vae_scale_factor)  # the latents the pipeline denoises for `side`-pixel images
    latents = torch.randn(rows * requests, cfg.in_channels, latent, latent, generator=gen).to(device)
    states = torch.randn(rows * requests, pipe.tokenizer.model_max_length, cfg.cross_attention_dim,
                         generator=gen).to(device)
    step_t = torch.tensor(500, device=device)

    def unet_serial():
        for i in range(requests):
            part = slice(i * rows, (i + 1) * rows)
            float(bare(latents[part], step_t, encoder_hidden_states=states[part]).sample.sum())

    def unet_batched():
        float(bare(latents, step_t, encoder_hidden_states=states).sample.sum())

    return unet_serial, unet_batched
