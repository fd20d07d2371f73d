"""The frozen base model and its tokenizer, from a hub id, a local folder or s3://, wrapped by peftray.tuners."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from peftray.data import PreparedData, prepare_data
from peftray.errors import ConfigError
from peftray.jobspec import JobSpec
from peftray.train import diffusion
from peftray.tuners.methods import method_for_spec
from peftray.tuners.tasks import TASKS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_base(spec: JobSpec, config=None) -> str:
    """A local folder or hub id `from_pretrained` can read; an s3:// model is downloaded once to the cache."""
    from peftray.base_models import local_model_dir

    return local_model_dir(spec.base_model.path, config, field="base_model.path")


def tokenizer_and_data(spec: JobSpec, path: str, config=None) -> tuple[Any, PreparedData]:
    """The base's tokenizer (image_cls: its image processor) and the prepared dataset; a task/base mismatch is
    refused first."""
    diffusion.check_base(spec, path)
    check_head(spec, path)
    if TASKS[spec.task].image_processor:
        processor = load_image_processor(spec, path)
        return processor, prepare_data(spec, None, config, image_processor=processor)
    if not TASKS[spec.task].diffusion:
        tok = load_tokenizer(spec, path)
        return tok, prepare_data(spec, tok, config)
    tok = diffusion.load_tokenizer(spec, path)
    return tok, prepare_data(spec, tok, config, image_size=diffusion.image_size(spec, path))


def load_text_to_image(spec: JobSpec, path: str, data: PreparedData, device: torch.device):
    """The pipeline's UNet wrapped with the spec's adapter, inside a `TextToImageModel`; the data's images are
    encoded into latents once, here."""
    dtype = DTYPES.get(spec.base_model.dtype) or PRECISION_DTYPES[spec.training.precision]
    parts = diffusion.load_parts(spec, path, dtype, device)
    unet = wrap(spec, parts["unet"], spec.base_model.path)
    if spec.text_encoder_targets:
        parts["text_encoder"] = wrap_text_encoder(spec, parts["text_encoder"], spec.base_model.path)
    model = diffusion.TextToImageModel(unet, parts, spec.training.snr_gamma)
    diffusion.attach_latents(model, data.train, 0)
    diffusion.attach_latents(model, data.eval, len(data.train))
    return model


def _heads(auto_model: str) -> dict[str, str] | None:
    """transformers' model_type -> class table behind an Auto class (None if this transformers hides it)."""
    import transformers

    return getattr(getattr(getattr(transformers, auto_model, None), "_model_mapping", None), "_model_mapping", None)


def check_head(spec: JobSpec, path: str) -> None:
    """Refuse a base whose model type the task's Auto class cannot load (image_cls on a causal LM, causal_lm on a
    ViT), from the folder's config.json, before any weights load. Hub ids, pipeline folders and remote code
    (`auto_map`) are left to `from_pretrained`."""
    task = TASKS[spec.task]
    config_file = Path(path) / "config.json"
    if task.diffusion or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return
    heads, model_type = _heads(task.auto_model), config.get("model_type")
    if heads is None or "auto_map" in config or model_type in heads:
        return
    fits = [n for n, t in TASKS.items() if not t.diffusion and model_type in (_heads(t.auto_model) or {})]
    hint = f"; use task: {' or '.join(fits)}, or another base model" if fits else "; use another base model"
    make = " (`peftray make-tiny-model --kind vit DIR` makes a tiny ViT)" if task.image_processor else ""
    raise ConfigError(f"`task: {spec.task}` needs a base model that {task.auto_model} loads{make}, but "
                      f"`base_model.path` {spec.base_model.path} is a {model_type!r} model "
                      f"({', '.join(config.get('architectures') or []) or 'no architectures listed'}){hint}")


def load_image_processor(spec: JobSpec, path: str):
    """The base model's image processor (preprocessor_config.json): how images are resized and normalized."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, revision=spec.base_model.revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"`base_model.path` {spec.base_model.path!r}: cannot load an image processor ({exc}). "
                          f"`task: {spec.task}` needs a model folder with preprocessor_config.json (an s3:// copy of "
                          "one, or a reachable hub id)") from None


def load_tokenizer(spec: JobSpec, path: str):
    """The base model's tokenizer, with a pad token (eos when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=spec.base_model.revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"`base_model.path` {spec.base_model.path!r}: cannot load a tokenizer ({exc}). "
                          "Give a transformers model folder, an s3:// copy of one, or a reachable hub id") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_quantization(spec: JobSpec) -> None:
    """Refuse quantization where bitsandbytes cannot do it, before any worker starts."""
    if not spec.quantization:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"`quantization: {spec.quantization}` needs bitsandbytes (peftray's `quant` extra: pip install 'bitsandbytes>=0.45'), "
                          "or remove `quantization`") from None
    if spec.quantization == "8bit" and not spec.resources.use_gpu:
        raise ConfigError("`quantization: 8bit` needs CUDA (bitsandbytes' int8 matmul has no CPU kernel); "
                          "use quantization=4bit on CPU, or set resources.use_gpu=true")


def load_base(spec: JobSpec, path: str, tokenizer, label_names: list[str] | None, device: torch.device):
    """The frozen base model on `device`, in the dtype the spec asks for, quantized when asked."""
    import transformers

    dtype = DTYPES.get(spec.base_model.dtype) or PRECISION_DTYPES[spec.training.precision]
    kwargs: dict = {"revision": spec.base_model.revision, "dtype": dtype}
    if spec.quantization:
        kwargs["quantization_config"] = _bnb_config(spec.quantization, dtype)
        kwargs["device_map"] = {"": device}
    task = TASKS[spec.task]
    if task.classification:
        names = label_names or []
        # the head is sized from the label names: a saved head of another size is replaced by a new one
        kwargs.update(num_labels=len(names), id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True)
    model = getattr(transformers, task.auto_model).from_pretrained(path, **kwargs)
    pad = getattr(tokenizer, "pad_token_id", None)  # an image processor has none, nor does a ViT config
    if pad is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model if spec.quantization else model.to(device)


def _bnb_config(kind: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def wrap(spec: JobSpec, model, base_ref: str):
    """Wrap the base with the spec's adapter through peftray.tuners; only adapter weights stay trainable."""
    from peftray.task_models import get_peft_model

    config_cls = method_for_spec(spec.method).config_cls
    kwargs = spec.peft_kwargs(base_ref)
    kwargs["base_model_name_or_path"] = base_ref
    if spec.base_model.revision:
        kwargs["revision"] = spec.base_model.revision
    if spec.quantization:
        _prepare_quantized(model)
    torch.manual_seed(spec.training.seed)  # every rank builds the same initial adapter
    peft_model = get_peft_model(model, config_cls(**kwargs))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"`adapter` ({spec.method}) matched no module of {base_ref}; check adapter.target_modules")
    return peft_model


# options that name UNet modules or layers; the text encoder's LoRA takes the rest (r, alpha, dropout, init, DoRA)
_UNET_ONLY = ("exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern",
              "alpha_pattern")


def wrap_text_encoder(spec: JobSpec, text_encoder, base_ref: str):
    """LoRA on the pipeline's CLIP text encoder (`adapter.text_encoder_target_modules`), through peftray.tuners as
    the UNet's; called after `wrap`, so the seed it set makes the same initial adapter on every rank."""
    from peftray.task_models import get_peft_model

    kwargs = {k: v for k, v in spec.peft_kwargs(base_ref).items() if k not in _UNET_ONLY}
    kwargs.update(target_modules=list(spec.text_encoder_targets), base_model_name_or_path=base_ref)
    if spec.base_model.revision:
        kwargs["revision"] = spec.base_model.revision
    try:
        return get_peft_model(text_encoder, method_for_spec(spec.method).config_cls(**kwargs))
    except ConfigError as exc:  # the tuner names `target_modules`; the user wrote the text encoder's field
        raise ConfigError(f"`adapter.text_encoder_target_modules` {spec.text_encoder_targets} on the text encoder of "
                          f"{base_ref}: {exc} (CLIP's attention projections are q_proj, k_proj, v_proj, "
                          "out_proj)") from None


def _prepare_quantized(model) -> None:
    # QLoRA recipe: freeze everything, keep norms in fp32 for stability, let inputs carry grads
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and param.ndim == 1:
            param.data = param.data.float()
    model.enable_input_require_grads()
