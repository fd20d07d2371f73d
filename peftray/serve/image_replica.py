"""The engine replica of a text_to_image deployment: the pipeline once, UNet adapters in LRU slots, and the
batched denoising engine of `peftray.serve.diffusion`; images leave as base64 PNGs.

It answers the same calls as the text replica (`generate_all`, `stats`, `check_health`), so the ingress, the
resolver, admission, retries and Serve's multiplexed routing are the text deployment's, unchanged; slots,
cancellation, counters and health are `EngineReplica`'s (shared with the classification replica).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from typing import Optional

import numpy as np
from ray import serve

from peftray.errors import PeftrayError
from peftray.serve.replica import REPLICA_OPTIONS, EngineReplica, error_event
from peftray.serve.serve_spec import ServeConfig, replica_placement

log = logging.getLogger("peftray.serve")


def png_base64(image: np.ndarray) -> str:
    """One [H, W, 3] float image in [0, 1] as base64 PNG bytes (diffusers' own rounding to uint8)."""
    from PIL import Image

    pixels = (image * 255).round().astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@serve.deployment(name="ImageEngine", **REPLICA_OPTIONS)
class ImageEngine(EngineReplica):
    """One replica of a text_to_image deployment."""

    @staticmethod
    def load_engine(spec: ServeConfig):
        return load_image_engine(spec)

    async def generate_all(self, key: Optional[str], job: dict) -> dict:
        """One image request (`job["image"]`: ImageParams fields, size as "WxH") -> {"images": [b64 PNG]}."""
        from peftray.serve.diffusion import ImageParams

        try:
            fields = dict(job["image"])
            width, height = self.engine.parse_size(fields.pop("size", None))
            params = ImageParams(width=width, height=height, **fields)
            images = await self.run_request(key, lambda adapter, on_done: self.engine.submit(params, adapter, on_done))
            pngs = await asyncio.to_thread(lambda: [png_base64(im) for im in images])
            return {"images": pngs, "finished": True, "engine": self._counters()}
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error for the client
            if not isinstance(exc, PeftrayError):
                log.exception("image request failed")
            return error_event(exc)

    async def stats(self) -> dict:
        e = self.engine
        return {**self._counters(), "adapters": e.loaded_adapters(), "steps": e.steps, "images": e.images,
                "unet_rows": list(e.unet_rows)}


def load_image_engine(spec: ServeConfig):
    """The DiffusionEngine of a text_to_image serve spec: the pipeline on its device and dtype."""
    from peftray.base_models import local_model_dir
    from peftray.serve.diffusion import DiffusionEngine, load_pipeline

    device, dtype = replica_placement(spec, cuda_auto_dtype="float16")
    pipe = load_pipeline(str(local_model_dir(spec.base_model)), device, dtype)
    return DiffusionEngine(pipe, max_batch_size=spec.max_batch_size, max_queue=spec.max_ongoing_requests,
                           max_adapters=spec.max_adapters_per_replica, sizes=spec.image_sizes)

