"""A tiny Stable Diffusion pipeline made offline: `make_tiny_sd(path)` writes a folder that
`diffusers.StableDiffusionPipeline.from_pretrained(path)` loads.

No model hub is reachable where peftray is tested, so the text-to-image tests and examples train on this:
a 2-block UNet2DConditionModel (cross-attention dim 32), a 2-block AutoencoderKL (32x32 images, 16x16
latents), a 2-layer CLIPTextModel and a CLIPTokenizer whose vocab.json/merges.txt are written here (every
byte-level character, plus one merge chain per word of the synthetic captions), and a DDPM scheduler.
The weights are random but seeded, so the folder is the same on every machine; a training step takes
tens of milliseconds on one CPU core.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from peftray.base_models import build_model_folder

TINY_SD_VERSION = 1  # bump when the recipe changes, so cached folders are rebuilt
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# words the synthetic captions use (peftray.data.shapes); any other word still tokenizes, letter by letter
WORDS = ("a", "an", "red", "green", "blue", "yellow", "circle", "square", "triangle", "cross", "small", "big",
         "on", "white", "black", "background", "image", "of", "photo", "the")


@dataclass(frozen=True)
class TinySDSpec:
    """Sizes of the tiny pipeline and its scheduler's prediction type (`epsilon` or `v_prediction`)."""

    image_size: int = 32
    cross_attention_dim: int = 32
    max_tokens: int = 16
    prediction_type: str = "epsilon"
    seed: int = 0


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def clip_vocab_and_merges(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """A valid CLIP BPE vocabulary: each byte-level character (alone and word-final), then each word built by
    merges left to right (`r e` -> `re`, `re d</w>` -> `red</w>`), then the two special tokens."""
    chars = _byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in tokens:
                tokens.append(parts[0])
    merges = list(dict.fromkeys(merges))
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def _tokenizer(folder: Path, spec: TinySDSpec):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=spec.max_tokens,
                         bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)


def _components(spec: TinySDSpec, tokenizer) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=spec.image_size // 2, block_out_channels=(32, 64), layers_per_block=1, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        sample_size=spec.image_size, block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, norm_num_groups=32)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.cross_attention_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=spec.max_tokens, projection_dim=spec.cross_attention_dim,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS), eos_token_id=eos, pad_token_id=eos))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
                              prediction_type=spec.prediction_type)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def _write(spec: TinySDSpec, out: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    tokenizer = _tokenizer(out / "tokenizer", spec)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        parts = _components(spec, tokenizer)
    pipe = StableDiffusionPipeline(**parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def make_tiny_sd(path: str | os.PathLike, spec: TinySDSpec | None = None, overwrite: bool = False) -> Path:
    """Write the tiny Stable Diffusion pipeline folder to `path` and return it.

    Idempotent (a folder already made with the same spec is reused) and atomic (see `build_model_folder`).
    """
    spec = spec or TinySDSpec()
    if spec.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {spec.prediction_type!r}")
    marker = {"peftray_tiny_sd": TINY_SD_VERSION, **asdict(spec)}
    return build_model_folder(path, marker, lambda tmp: _write(spec, tmp), overwrite, "tiny SD pipeline")
