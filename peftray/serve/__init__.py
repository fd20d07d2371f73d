"""Multi-adapter serving on Ray Serve: one base model per application, many adapters, OpenAI-compatible.

    deploy("serve.yaml") -> Deployment(url, api_key)   status() -> {app: {...}}   down(name)
    GenerationEngine(model, tokenizer, ...)            the continuous-batching engine (no Ray needed)
    DiffusionEngine(pipeline, ...)                     the text-to-image engine: one UNet call per step (no Ray)
    ClassificationEngine(model, processor, task=...)   the seq_cls / image_cls engine behind /v1/classify (no Ray)

Importing this package starts nothing; Ray is imported when a function that needs it runs.
"""

from __future__ import annotations

_LAZY = {
    "ServeConfig": "peftray.serve.serve_spec", "load_serve_config": "peftray.serve.serve_spec",
    "Deployment": "peftray.serve.lifecycle", "deploy": "peftray.serve.lifecycle", "status": "peftray.serve.lifecycle",
    "down": "peftray.serve.lifecycle", "GenerationEngine": "peftray.serve.engine", "SamplingParams": "peftray.serve.engine",
    "ModelResolver": "peftray.serve.watch", "DiffusionEngine": "peftray.serve.diffusion",
    "ImageParams": "peftray.serve.diffusion", "ClassificationEngine": "peftray.serve.classify",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftray.serve' has no attribute {name!r}")


__all__ = sorted(_LAZY)
