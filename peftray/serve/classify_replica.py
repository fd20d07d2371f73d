"""The engine replica of a seq_cls or image_cls deployment: the classifier once, LoRA adapters (each with its own
head) in LRU slots, and the batched engine of `peftray.serve.classify`.

It answers the same calls as the other replicas (`generate_all`, `stats`, `check_health`), so the ingress, the
resolver, admission, retries and Serve's multiplexed routing are the text deployment's, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from ray import serve

from peftray.errors import ConfigError, PeftrayError
from peftray.serve.replica import REPLICA_OPTIONS, EngineReplica, error_event
from peftray.serve.serve_spec import ServeConfig, replica_placement

log = logging.getLogger("peftray.serve")


@serve.deployment(name="ClassifierEngine", **REPLICA_OPTIONS)
class ClassifierEngine(EngineReplica):
    """One replica of a seq_cls / image_cls deployment."""

    @staticmethod
    def load_engine(spec: ServeConfig):
        return load_classify_engine(spec)

    async def generate_all(self, key: Optional[str], job: dict) -> dict:
        """One request (`job["classify"]`: `input` as a list, `top_k`) -> {"data": [per input], "usage"}."""
        try:
            fields = job["classify"]
            rows, tokens = await asyncio.to_thread(self.engine.encode, fields["input"])
            logits = await self.run_request(key, lambda adapter, on_done: self.engine.submit(rows, adapter, on_done))
            usage = {"inputs": len(rows), "prompt_tokens": tokens, "total_tokens": tokens}
            return {"data": self.engine.results(logits, fields.get("top_k")), "usage": usage, "finished": True,
                    "engine": self._counters()}
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error for the client
            if not isinstance(exc, PeftrayError):
                log.exception("classify request failed")
            return error_event(exc)

    async def stats(self) -> dict:
        e = self.engine
        return {**self._counters(), "adapters": e.loaded_adapters(), "steps": e.steps, "rows": e.rows_done,
                "forward_rows": list(e.forward_rows), "labels": e.labels}


def load_classify_engine(spec: ServeConfig):
    """The ClassificationEngine of a seq_cls / image_cls serve spec: the classifier on its device and dtype.

    The head's weights that the base folder lacks (a plain encoder such as MiniLM has no classifier) are drawn
    from a fixed seed, so every replica answers the base model's requests alike; `labels` in the spec sizes the
    head and names its classes, as a training job's label names do.
    """
    import torch
    import transformers

    from peftray.base_models import local_model_dir
    from peftray.serve.classify import ClassificationEngine
    from peftray.tuners.tasks import TASKS

    device, dtype = replica_placement(spec, cuda_auto_dtype="bfloat16")
    path = local_model_dir(spec.base_model)
    kwargs: dict = {"dtype": dtype}
    if spec.labels:
        kwargs.update(num_labels=len(spec.labels), id2label=dict(enumerate(spec.labels)),
                      label2id={n: i for i, n in enumerate(spec.labels)}, ignore_mismatched_sizes=True)
    auto = TASKS[spec.task].auto_model
    try:
        processor = (transformers.AutoTokenizer if spec.task == "seq_cls" else transformers.AutoImageProcessor
                     ).from_pretrained(path)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = getattr(transformers, auto).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        what = "a tokenizer" if spec.task == "seq_cls" else "an image processor (preprocessor_config.json)"
        raise ConfigError(f"`base_model` {spec.base_model!r} is not a {auto} model folder with {what} ({exc}); a "
                          f"task: {spec.task} deployment needs one.") from exc
    return ClassificationEngine(model.to(device).eval(), processor, task=spec.task,
                                max_batch_size=spec.max_batch_size, max_queue=spec.max_ongoing_requests,
                                max_adapters=spec.max_adapters_per_replica)

