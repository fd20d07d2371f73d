"""The text-to-image engine of one replica: many requests, many UNet adapters, ONE UNet forward per step.

Each request (a prompt, `n` images, an adapter or the base) becomes a *group* of rows: its n latents, twice
over with classifier-free guidance (the unconditional rows first, as diffusers orders them). A group has its
own copy of the pipeline's scheduler and its own `torch.Generator`, so its images are those of

    pipe(prompt, num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed), ...)

whatever else shares the batch. A background thread runs the loop: take new groups while their rows fit in
`max_batch_size`, then one denoising step for every running group in ONE UNet call: the groups' latents
concatenated, each row with its own timestep (groups join between steps, each at its own first timestep),
and the LoRA layers applying each row's adapter (`adapter_names`, peftray's mixed-adapter path). A group
that has taken its last step is decoded by the VAE and leaves.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from peftray.adapters import io as adapter_io
from peftray.adapters.diffusers_lora import TEXT_ENCODER_DIR
from peftray.errors import AdapterFormatError, ConfigError
from peftray.serve.engine_queue import EngineQueue
from peftray.serve.slots import (AdapterSlots, LoadedAdapter, LoraHost, OverloadedError, check_modules,
                                 internal_name)
from peftray.serve.watch import field_error

BASE = "__base__"


@dataclass
class ImageParams:
    """One request's fields, checked by the API layer (sizes by `DiffusionEngine.check`)."""

    prompt: str
    width: int
    height: int
    n: int = 1
    steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None


@dataclass(eq=False)
class _Group:
    params: ImageParams
    adapter: Optional[LoadedAdapter]
    on_done: Callable[[Optional[np.ndarray], Optional[BaseException]], None]
    cancelled: bool = False
    done: bool = False
    # set when the group starts (in the engine thread)
    scheduler: object = None
    generator: Optional[torch.Generator] = None
    embeds: Optional[torch.Tensor] = None  # [rows, tokens, dim]: negative rows then positive rows with guidance
    latents: Optional[torch.Tensor] = None  # [n, channels, h, w]
    extra: Optional[dict] = None  # the scheduler step's generator / eta
    step: int = 0

    @property
    def guided(self) -> bool:
        return self.params.guidance_scale > 1.0

    @property
    def rows(self) -> int:
        return self.params.n * (2 if self.guided else 1)

    @property
    def lora_name(self) -> str:
        return self.adapter.internal if self.adapter is not None else BASE


class DiffusionEngine(EngineQueue, LoraHost):
    """Batched denoising over a diffusers Stable Diffusion pipeline with UNet LoRA adapters in slots.

    Args:
        pipeline: a `StableDiffusionPipeline` (eval mode, on its device; its UNet is wrapped in a PeftModel
            when the first adapter arrives).
        max_batch_size: most UNet rows in one forward (a guided image is two rows).
        max_queue: requests waiting to join; more are refused with OverloadedError.
        max_adapters: adapter slots (LRU).
        sizes: the "WxH" sizes requests may ask for (default: the pipeline's native size only).
    """

    def __init__(self, pipeline, *, max_batch_size: int = 8, max_queue: int = 64, max_adapters: int = 8,
                 sizes: Optional[list[str]] = None) -> None:
        self.pipe = pipeline
        self.base = pipeline.unet.eval()
        self.peft = None
        self._dormant: Optional[str] = None
        # text-encoder halves of adapters (their folders' text_encoder/): one PeftModel around the pipeline's
        # text encoder, made on the first; `_te_adapters` the loaded ones, `_te_pending` read, not yet loaded
        self.te_peft = None
        self._te_dormant: Optional[str] = None
        self._te_adapters: dict[str, str] = {}  # slot's internal name -> its adapter name in te_peft
        self._te_pending: dict[str, tuple] = {}
        self._te_loads = 0
        self.device, self.dtype = self.base.device, self.base.dtype
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.sizes = sizes or [f"{self.native_size}x{self.native_size}"]
        for size in self.sizes:
            self._check_size(size, "image_sizes")
        self.slots = AdapterSlots(self, max_adapters)
        self._model_lock = threading.RLock()
        self._cv = threading.Condition()
        self._pending: list[_Group] = []
        self._groups: list[_Group] = []
        self._closed = False
        self.steps = self.images = 0
        self.unet_rows: list[int] = []  # rows of the last UNet calls (kept short): what was batched together
        self.last_step = time.monotonic()
        self._stepping = False
        self._thread = threading.Thread(target=self._loop, name="peftray-diffusion", daemon=True)
        self._thread.start()

    # --- sizes and adapters ---------------------------------------------------------------------------
    @property
    def native_size(self) -> int:
        return int(self.base.config.sample_size) * int(self.pipe.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
        return int(self.pipe.vae_scale_factor) * 2 ** (len(self.base.config.block_out_channels) - 1)

    def _check_size(self, size: str, field: str) -> tuple[int, int]:
        try:
            w, h = (int(x) for x in size.lower().split("x"))
        except ValueError:
            raise field_error(field, f"`{field}` must be \"WIDTHxHEIGHT\" (e.g. \"512x512\"), got {size!r}.") from None
        m = self.size_multiple
        if w <= 0 or h <= 0 or w % m or h % m:
            raise field_error(field, f"`{field}` {size!r}: this pipeline makes images whose sides are multiples "
                                     f"of {m}.")
        return w, h

    def parse_size(self, size: Optional[str]) -> tuple[int, int]:
        """(width, height) of a request's `size` (None: the first served size); ConfigError naming `size`."""
        size = size or self.sizes[0]
        if size not in self.sizes:
            raise field_error("size", f"`size` {size!r} is not served by this deployment; it makes "
                                      f"{', '.join(self.sizes)} (the serve spec's image_sizes).")
        return self._check_size(size, "size")

    def check_adapter(self, key: str, config, state: dict) -> None:
        from peftray.tuners.config import PeftType

        if config.peft_type != PeftType.LORA:
            raise AdapterFormatError(f"adapter {key!r} (the request's `model`) is {config.peft_type.value}; "
                                     "text-to-image deployments serve UNet LoRA adapters only.")
        if config.task_type is not None:
            raise AdapterFormatError(f"adapter {key!r} (the request's `model`) has task_type "
                                     f"{config.task_type.value}: a text adapter; send it to a text deployment.")
        check_modules(key, config, state, self.base, "UNet")

    def check_folder(self, key: str, folder) -> None:
        """A text_to_image job with `adapter.text_encoder_target_modules` saves its text encoder's LoRA in
        `text_encoder/`: read and check it here; `add_lora` loads it beside the UNet's under the same name."""
        from peftray.tuners.config import PeftType

        te = folder / TEXT_ENCODER_DIR
        if not (te / "adapter_config.json").is_file():
            return
        config, state = adapter_io.read_adapter(str(te))
        if config.peft_type != PeftType.LORA:
            raise AdapterFormatError(f"adapter {key!r} (the request's `model`): its text_encoder/ part is "
                                     f"{config.peft_type.value}; text-to-image deployments serve LoRA only.")
        check_modules(key, config, state, self.pipe.text_encoder, "text encoder")
        self._te_pending[internal_name(key)] = (config, state)

    def add_lora(self, internal: str, config, state: dict) -> None:
        te = self._te_pending.pop(internal, None)
        LoraHost.add_lora(self, internal, config, state)
        if te is None:
            return
        try:
            self._add_text_encoder_lora(internal, *te)
        except BaseException:
            LoraHost.remove_lora(self, internal)  # all of the adapter or none of it
            raise

    def _add_text_encoder_lora(self, internal: str, config, state: dict) -> None:
        from peftray.task_models import PeftModel

        with self._model_lock:
            name = internal  # the dormant adapter may hold the name (the same key loaded again): use a fresh one
            while self.te_peft is not None and name in self.te_peft.peft_config:
                self._te_loads += 1
                name = f"{internal}_{self._te_loads}"
            if self.te_peft is None:
                self.te_peft = PeftModel.from_pretrained(self.pipe.text_encoder, (config, state), adapter_name=name,
                                                         on_base_mismatch="ignore", autocast_adapter_dtype=False).eval()
            else:
                self.te_peft.load_adapter((config, state), adapter_name=name, on_base_mismatch="ignore",
                                          autocast_adapter_dtype=False)
            if self._te_dormant is not None:
                self.te_peft.delete_adapter(self._te_dormant)
                self._te_dormant = None
            self._te_adapters[internal] = name

    def remove_lora(self, internal: str) -> None:
        LoraHost.remove_lora(self, internal)
        with self._model_lock:
            name = self._te_adapters.pop(internal, None)
            if name is None:
                return
            if len(self.te_peft.peft_config) == 1:
                self._te_dormant = name  # a PeftModel keeps one adapter; prompts skip it (not in _te_adapters)
            else:
                self.te_peft.delete_adapter(name)

    def _encode(self, group: "_Group"):
        """(positive, negative) prompt embeddings, through the group's text-encoder LoRA when it has one (a group's
        prompt is encoded once, when it starts: one adapter at a time is exact, and cheap beside the steps)."""
        p = group.params
        name = self._te_adapters.get(group.adapter.internal) if group.adapter is not None else None
        ctx = contextlib.nullcontext()
        if name is not None:
            self.te_peft.set_adapter(name)
        elif self.te_peft is not None:
            ctx = self.te_peft.disable_adapter()
        with ctx:
            return self.pipe.encode_prompt(p.prompt, self.device, p.n, group.guided, p.negative_prompt)

    def prompt_tensors(self, config, state: dict):
        raise AdapterFormatError("prompt-learning adapters have no meaning for a UNet; serve a LoRA adapter.")

    def loaded_adapters(self) -> list[str]:
        return self.slots.keys()

    # --- requests -------------------------------------------------------------------------------------
    def submit(self, params: ImageParams, adapter: Optional[LoadedAdapter],
               on_done: Callable[[Optional[np.ndarray], Optional[BaseException]], None]) -> _Group:
        """Queue a request; `on_done(images, error)` is called from the engine thread, images as float
        [n, height, width, 3] in [0, 1] (diffusers' `output_type="np"`).

        Raises:
            ConfigError: more rows than one batch holds. OverloadedError: the queue is full.
        """
        group = _Group(params, adapter, on_done)
        if group.rows > self.max_batch_size:
            raise field_error("n", f"`n`={params.n} needs {group.rows} rows (two per image with guidance_scale > 1) "
                                   f"but this deployment's max_batch_size is {self.max_batch_size}; ask for fewer "
                                   "images.")
        return self._enqueue(group)

    def cancel(self, group: _Group) -> None:
        group.cancelled = True

    def generate(self, params: ImageParams, adapter: Optional[LoadedAdapter] = None) -> np.ndarray:
        """Blocking helper (tests, benchmarks): one request's images."""
        return self.generate_many([(params, adapter)])[0]

    def generate_many(self, requests: list[tuple[ImageParams, Optional[LoadedAdapter]]]) -> list[np.ndarray]:
        """Blocking helper: submit every request at once (so they share batches) and wait for all."""
        return self._run_all([lambda on_done, p=p, a=a: self.submit(p, a, on_done) for p, a in requests])

    def _in_flight(self) -> bool:
        return bool(self._groups)

    @property
    def running(self) -> int:
        return len(self._groups)

    # --- the loop -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._groups and not self._closed:
                    self._cv.wait()
                    self.last_step = time.monotonic()
                if self._closed:
                    break
                new = self._take()
                self._stepping = True
            try:
                with self._model_lock, torch.inference_mode():
                    for group in new:
                        self._start(group)
                    self._groups = [g for g in self._groups + new if not self._drop(g)]
                    # counted before it runs: a request its last step finishes wakes a caller who may read it
                    self.steps += 1
                    if self._groups:
                        self._step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its groups, never the loop
                for group in self._groups + new:
                    self._finish(group, None, exc)
                self._groups = []
            finally:
                self.last_step, self._stepping = time.monotonic(), False
        with self._cv:
            left, self._pending = self._groups + self._pending, []
        for group in left:
            self._finish(group, None, OverloadedError("the engine shut down; retry on another replica."))

    def _take(self) -> list[_Group]:
        """Pending groups (in order) whose rows fit beside the running ones."""
        room = self.max_batch_size - sum(g.rows for g in self._groups)
        new, keep = [], []
        for group in self._pending:
            if group.rows <= room and not keep:
                new.append(group)
                room -= group.rows
            else:
                keep.append(group)  # first come, first served: no overtaking by smaller requests
        self._pending = keep
        return new

    def _drop(self, group: _Group) -> bool:
        if group.cancelled and not group.done:
            self._finish(group, None, None)
        return group.done

    def _start(self, group: _Group) -> None:
        """Prompt embeddings, a fresh scheduler and the first latents, exactly as the pipeline makes them."""
        p, pipe = group.params, self.pipe
        if group.cancelled:
            return
        group.generator = torch.Generator(device="cpu").manual_seed(
            p.seed if p.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
        positive, negative = self._encode(group)
        group.embeds = torch.cat([negative, positive]) if group.guided else positive
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(p.steps, device=self.device)
        group.scheduler = scheduler
        channels = self.base.config.in_channels
        group.latents = pipe.prepare_latents(p.n, channels, p.height, p.width, group.embeds.dtype, self.device,
                                             group.generator)
        group.extra = pipe.prepare_extra_step_kwargs(group.generator, 0.0)

    def _step(self) -> None:
        groups = self._groups
        inputs, times, names = [], [], []
        for g in groups:
            t = g.scheduler.timesteps[g.step]
            x = torch.cat([g.latents] * 2) if g.guided else g.latents
            inputs.append(g.scheduler.scale_model_input(x, t))
            times.append(t.reshape(1).expand(g.rows))
            names += [g.lora_name] * g.rows
        sample, timesteps = torch.cat(inputs), torch.cat(times)
        hidden = torch.cat([g.embeds for g in groups])
        self.unet_rows = (self.unet_rows + [len(names)])[-64:]
        if self.peft is not None:
            pred = self.peft(sample, timesteps, encoder_hidden_states=hidden, adapter_names=names,
                             return_dict=False)[0]
        else:
            pred = self.base(sample, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
        at = 0
        for g in groups:
            out, at = pred[at:at + g.rows], at + g.rows
            if g.guided:
                uncond, text = out.chunk(2)
                out = uncond + g.params.guidance_scale * (text - uncond)
            g.latents = g.scheduler.step(out, g.scheduler.timesteps[g.step], g.latents, **g.extra,
                                         return_dict=False)[0]
            g.step += 1
        for g in groups:
            if g.step >= len(g.scheduler.timesteps):
                self._finish(g, self._decode(g), None)
        self._groups = [g for g in groups if not g.done]

    def _decode(self, group: _Group) -> np.ndarray:
        vae = self.pipe.vae
        image = vae.decode(group.latents / vae.config.scaling_factor, return_dict=False,
                           generator=group.generator)[0]
        self.images += group.params.n
        return self.pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * len(image))


def load_pipeline(path: str, device: str, dtype: torch.dtype):
    """A StableDiffusionPipeline from a folder, without a safety checker, on `device` in `dtype`, eval mode."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"`base_model` {path!r} is not a diffusers Stable Diffusion pipeline folder ({exc}); a "
                          "text_to_image deployment needs one (peftray make-tiny-model --kind sd DIR).") from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.eval()
    if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        raise ConfigError(f"`base_model` {path!r} has a guidance-embedding UNet (LCM); peftray serves classic "
                          "classifier-free guidance pipelines only.")
    return pipe
