"""The engine replica of a text_to_image deployment: the pipeline once, UNet adapters in LRU slots, and the
batched denoising engine of `peftray.serve.diffusion`; images leave as base64 PNGs.

It answers the same calls as the text replica (`generate_all`, `stats`, `check_health`), so the ingress, the
resolver, admission, retries and Serve's multiplexed routing are the text deployment's, unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
from typing import Optional

import numpy as np
from ray import serve

from peftray.errors import PeftrayError
from peftray.serve.serve_spec import ServeConfig, replica_placement

log = logging.getLogger("peftray.serve")


def png_base64(image: np.ndarray) -> str:
    """One [H, W, 3] float image in [0, 1] as base64 PNG bytes (diffusers' own rounding to uint8)."""
    from PIL import Image

    pixels = (image * 255).round().astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image_error_event(exc: BaseException) -> dict:
    """An OpenAI error for the ingress; adapter problems name `model`, the request's adapter."""
    from peftray.errors import AdapterFormatError

    status = int(getattr(exc, "http_status", 500)) if isinstance(exc, PeftrayError) else 500
    msg = str(exc) if isinstance(exc, PeftrayError) else f"internal error in the engine: {type(exc).__name__}: {exc}"
    param = "model" if isinstance(exc, AdapterFormatError) else getattr(exc, "param", None)
    return {"error": {"status": status, "message": msg, "code": getattr(exc, "code", "internal_error"),
                      "param": param}}


@serve.deployment(name="ImageEngine", health_check_period_s=2, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=5)
class ImageEngine:
    """One replica of a text_to_image deployment."""

    def __init__(self, spec: dict) -> None:
        from peftray.serve.replica import adapter_fetcher, keep_replica_grpc_on_loopback

        keep_replica_grpc_on_loopback()
        self.spec = ServeConfig.model_validate(spec)
        self.engine = load_image_engine(self.spec)
        self._adapter_path = adapter_fetcher(self.spec.max_adapters_per_replica)

    async def generate_all(self, key: Optional[str], job: dict) -> dict:
        """One image request (`job["image"]`: ImageParams fields, size as "WxH") -> {"images": [b64 PNG]}."""
        from peftray.serve.diffusion import ImageParams

        adapter, group = None, None
        try:
            fields = dict(job["image"])
            width, height = self.engine.parse_size(fields.pop("size", None))
            params = ImageParams(width=width, height=height, **fields)
            if key:
                path = await self._adapter_path(key)
                adapter = await self.engine.slots.acquire_async(key, path)
            loop = asyncio.get_running_loop()
            done: asyncio.Future = loop.create_future()

            def on_done(images, error) -> None:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result((images, error)))

            try:
                group = self.engine.submit(params, adapter, on_done)
            except BaseException:
                if adapter is not None:
                    self.engine.slots.release(adapter)
                raise
            images, error = await done
            if error is not None:
                raise error
            pngs = await asyncio.to_thread(lambda: [png_base64(im) for im in images])
            return {"images": pngs, "finished": True, "engine": self._counters()}
        except asyncio.CancelledError:  # the client went away or timed out: free the rows and the slot
            if group is not None:
                self.engine.cancel(group)
            elif adapter is not None:
                self.engine.slots.release(adapter)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error for the client
            if not isinstance(exc, PeftrayError):
                log.exception("image request failed")
            return image_error_event(exc)

    def _counters(self) -> dict:
        e = self.engine
        return {"running": e.running, "queued": e.queued, "loads": e.slots.loads, "evictions": e.slots.evictions,
                "load_seconds": e.slots.load_seconds, "loaded": len(e.loaded_adapters()), "pid": os.getpid()}

    async def stats(self) -> dict:
        e = self.engine
        return {**self._counters(), "adapters": e.loaded_adapters(), "steps": e.steps, "images": e.images,
                "unet_rows": list(e.unet_rows)}

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():
            raise RuntimeError("the engine thread stopped")
        stalled = self.engine.stalled_for()
        if stalled > self.spec.stall_timeout_s:
            raise RuntimeError(f"the engine has had requests but finished no step for {stalled:.0f} s")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def load_image_engine(spec: ServeConfig):
    """The DiffusionEngine of a text_to_image serve spec: the pipeline on its device and dtype."""
    from peftray.base_models import local_model_dir
    from peftray.serve.diffusion import DiffusionEngine, load_pipeline

    device, dtype = replica_placement(spec, cuda_auto_dtype="float16")
    pipe = load_pipeline(str(local_model_dir(spec.base_model)), device, dtype)
    return DiffusionEngine(pipe, max_batch_size=spec.max_batch_size, max_queue=spec.max_ongoing_requests,
                           max_adapters=spec.max_adapters_per_replica, sizes=spec.image_sizes)
