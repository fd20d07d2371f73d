"""`task: text_to_image`: an adapter on a Stable Diffusion UNet, trained with the scheduler's noise-prediction loss.

The base is a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
The VAE stays frozen, and so does the text encoder unless `adapter.text_encoder_target_modules` puts a LoRA on it
too (then its LoRA trains with the UNet's, the captions encoded under grad); the images are encoded into latents once, before the first step
(the latent distribution's mode, times the VAE's scaling factor). Each step then adds noise at random
timesteps with the pipeline's own scheduler and regresses the UNet's prediction on its target: the noise
(`prediction_type: epsilon`) or the velocity (`v_prediction`); `training.snr_gamma` applies min-SNR-gamma
weighting (Hang et al. 2023, as diffusers' train_text_to_image.py). Evaluation draws the noise and timestep of
each row from the row's own seed, so eval losses of different adapters (or of the base) are comparable.

`TextToImageModel` is what the loop trains: its forward returns the per-row loss; `save_pretrained` writes the
UNet adapter in the HF PEFT format (the text encoder's, if any, in its `text_encoder/` subfolder) and, beside it,
diffusers' pytorch_lora_weights.safetensors (`unet.` and `text_encoder.` tensors), so the folder loads with
`load_adapters(unet, text_encoder, folder)` (peftray's PeftModel) and with `pipeline.load_lora_weights(folder)`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftray.adapters.diffusers_lora import TEXT_ENCODER_DIR
from peftray.errors import ConfigError
from peftray.tuners.tasks import TASKS

PIPELINE_FILE = "model_index.json"
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_base(spec, path: str) -> None:
    """Refuse a task/base mismatch before any work: text_to_image needs a pipeline folder, other tasks must not
    get one. Hub ids (not local folders) are left to `from_pretrained`."""
    folder = Path(path)
    if not folder.is_dir():
        return
    index = folder / PIPELINE_FILE
    if TASKS[spec.task].diffusion:
        missing = [p for p in PARTS if not (folder / p).is_dir()]
        if not index.is_file() or missing:
            raise ConfigError(
                f"`task: {spec.task}` needs `base_model.path` to be a diffusers Stable Diffusion pipeline folder "
                f"({PIPELINE_FILE} and the subfolders {', '.join(PARTS)}); {spec.base_model.path} "
                f"{'lacks ' + ', '.join(missing) if index.is_file() else 'has no ' + PIPELINE_FILE}. "
                "Make one with `peftray make-tiny-model --kind sd DIR` or save a pipeline with save_pretrained")
    elif index.is_file():
        needs = [n for n, t in TASKS.items() if t.diffusion]
        raise ConfigError(f"`base_model.path` {spec.base_model.path} is a diffusers pipeline, but `task: {spec.task}` "
                          f"needs a transformers model folder; use task: {' or '.join(needs)} (with dataset.format "
                          "image_caption) or another base model")


def load_tokenizer(spec, path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=spec.base_model.revision)


def image_size(spec, path: str) -> int:
    """The square image size the pipeline's VAE takes (its config's `sample_size`)."""
    from diffusers import AutoencoderKL

    size = AutoencoderKL.load_config(path, subfolder="vae", revision=spec.base_model.revision).get("sample_size")
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def load_parts(spec, path: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The frozen pipeline parts on `device`: unet and text encoder in `dtype`, the VAE in float32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    rev = spec.base_model.revision
    parts = {
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev, torch_dtype=dtype),
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev, dtype=dtype),
        "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev),
        # training adds noise with DDPM's schedule built from the pipeline's own scheduler config
        "scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=rev),
        "tokenizer": load_tokenizer(spec, path),
    }
    for name in ("unet", "text_encoder", "vae"):
        parts[name].requires_grad_(False)
        parts[name].to(device)
    return parts


class TextToImageModel(nn.Module):
    """The adapted UNet (a PeftModel) with the parts it trains against; forward = per-row loss. The text encoder
    is frozen, or a PeftModel when the spec adapts it too (`adapts_text_encoder`)."""

    def __init__(self, unet: nn.Module, parts: dict[str, Any], snr_gamma: float | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = parts["text_encoder"]
        self.vae = parts["vae"]
        self.scheduler = parts["scheduler"]
        self.tokenizer = parts["tokenizer"]
        self.snr_gamma = snr_gamma

    @property
    def adapts_text_encoder(self) -> bool:
        return hasattr(self.text_encoder, "peft_config")

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [-1, 1] -> scaled latents [B, 4, S/f, S/f] (float32, on the VAE's device)."""
        device = next(self.vae.parameters()).device
        latents = self.vae.encode(pixels.to(device, torch.float32)).latent_dist.mode()
        return latents * self.vae.config.scaling_factor

    def _noise(self, latents: torch.Tensor, seeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        steps = self.scheduler.config.num_train_timesteps
        if self.training or seeds is None:
            noise = torch.randn_like(latents)
            return noise, torch.randint(0, steps, (latents.shape[0],), device=latents.device)
        noises, times = [], []
        for seed in seeds.tolist():  # evaluation: each row's noise and timestep come from its own seed
            gen = torch.Generator().manual_seed(int(seed))
            noises.append(torch.randn(latents.shape[1:], generator=gen))
            times.append(int(torch.randint(0, steps, (1,), generator=gen)))
        return torch.stack(noises).to(latents), torch.tensor(times, device=latents.device)

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, seeds: torch.Tensor | None = None,
                **_: Any) -> torch.Tensor:
        noise, timesteps = self._noise(latents, seeds)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with contextlib.nullcontext() if self.adapts_text_encoder else torch.no_grad():
            hidden = self.text_encoder(input_ids)[0]
        pred = self.unet(noisy.to(hidden.dtype), timesteps, encoder_hidden_states=hidden).sample
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ConfigError(f"the pipeline's scheduler predicts {self.prediction_type!r}; peftray trains "
                              "'epsilon' and 'v_prediction' only")
        per_row = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
        return per_row * self._snr_weights(timesteps) if self.snr_gamma else per_row

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr

    def save_pretrained(self, folder: str | Path) -> None:
        """The HF PEFT folder of the UNet adapter (the text encoder's in `text_encoder/`), plus diffusers'
        pytorch_lora_weights.safetensors holding both."""
        from peftray.adapters.io import write_diffusers_lora

        self.unet.save_pretrained(folder)
        text_encoder = None
        if self.adapts_text_encoder:
            self.text_encoder.save_pretrained(Path(folder) / TEXT_ENCODER_DIR)
            text_encoder = (self.text_encoder.peft_config["default"],
                            self.text_encoder.get_adapter_state_dict("default"))
        write_diffusers_lora(folder, self.unet.peft_config["default"], self.unet.get_adapter_state_dict("default"),
                             text_encoder=text_encoder)

    @contextlib.contextmanager
    def disable_adapter(self):
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.unet.disable_adapter())
            if self.adapts_text_encoder:
                stack.enter_context(self.text_encoder.disable_adapter())
            yield

    @torch.no_grad()
    def sample_grid(self, captions: list[str], seed: int = 0, steps: int = 8):
        """One row of generated images (a PIL image), one per caption, with a DDIM scheduler and a fixed seed."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from PIL import Image

        was_training = self.training
        self.eval()
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=_bare(self.text_encoder), tokenizer=self.tokenizer, unet=self.unet.get_base_model(),
            scheduler=DDIMScheduler.from_config(self.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(captions, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).images
        self.train(was_training)
        size = images[0].size[0]
        grid = Image.new("RGB", (size * len(images), size), (255, 255, 255))
        for i, image in enumerate(images):
            grid.paste(image, (i * size, 0))
        return grid


def _bare(model: nn.Module) -> nn.Module:
    """The model inside a PeftModel (its LoRA layers still in place, as the pipeline wants a plain model)."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def load_adapters(unet: nn.Module, text_encoder: nn.Module, folder: str | Path) -> tuple[nn.Module, nn.Module]:
    """(unet, text_encoder) with a saved text_to_image adapter folder applied through peftray's PeftModel: the
    UNet's always, the text encoder's when the folder has a `text_encoder/` adapter (else it is returned as is)."""
    from peftray.task_models import PeftModel

    unet = PeftModel.from_pretrained(unet, str(folder))
    if (Path(folder) / TEXT_ENCODER_DIR).is_dir():
        text_encoder = PeftModel.from_pretrained(text_encoder, str(Path(folder) / TEXT_ENCODER_DIR))
    return unet, text_encoder


def attach_latents(model: TextToImageModel, examples: list[dict], first_seed: int, batch: int = 32) -> None:
    """Replace each example's pixels by its latents (encoded once) and give it a seed for evaluation noise."""
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        latents = model.encode_images(torch.stack([e.pop("pixel_values") for e in chunk])).cpu()
        for k, (example, latent) in enumerate(zip(chunk, latents)):
            example["latents"] = latent
            example["seed"] = first_seed + i + k


# ---- the objective's parts (peftray.train.objectives builds the Objective) ----------------------------------
def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    return {"latents": torch.stack([e["latents"] for e in examples]),
            "input_ids": torch.tensor([e["input_ids"] for e in examples], dtype=torch.long),
            "seeds": torch.tensor([e["seed"] for e in examples], dtype=torch.long),
            # the loop counts attention_mask as its throughput unit: one per image here (tokens_per_s = images/s)
            "attention_mask": torch.ones(len(examples), 1, dtype=torch.long)}


def counts(batch: dict[str, torch.Tensor], spec) -> dict[str, float]:
    return {"rows": float(batch["latents"].shape[0])}


def loss(step) -> tuple[torch.Tensor, dict[str, float]]:
    per_row = step.model(**step.batch)
    total = per_row.sum()
    return total * step.world / max(step.counts["rows"], 1), {"loss": float(total.detach())}


def metrics(sums: dict[str, float], counts_: dict[str, float], spec, evaluating: bool) -> dict[str, float]:
    return {"loss": sums["loss"] / max(counts_["rows"], 1)}


def sample_captions(examples: list[dict], n: int = 4) -> list[str]:
    """Up to `n` distinct captions, in order, for the sample grid."""
    return list(dict.fromkeys(e["caption"] for e in examples))[:n]

