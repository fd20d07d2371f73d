"""The classification engine of one replica: texts (seq_cls) or images (image_cls), many adapters, ONE forward
per step.

A request is a list of inputs and an adapter (or the base). `encode` turns its inputs into rows in the caller's
thread: token ids, or pixel values as the base's image processor makes them. A background thread takes rows
first come, first served, up to `max_batch_size` from as many requests as fit, and runs them in ONE forward of
the classifier: the LoRA layers apply each row's adapter and the classifier head, which every classification
adapter trains and saves in full (`modules_to_save`), is each row's own adapter's copy (peftray's mixed-adapter
path, `adapter_names`). Text rows are right-padded to the longest in the batch under the attention mask, so a
row's logits do not depend on what shares its batch. A request whose rows have all run gets its logits back.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from peftray.errors import AdapterFormatError, ConfigError
from peftray.serve.engine_queue import EngineQueue
from peftray.serve.slots import AdapterSlots, LoadedAdapter, LoraHost, OverloadedError, check_modules
from peftray.serve.watch import field_error

BASE = "__base__"
MAX_INPUTS = 1024  # inputs in one request (a request's rows may span several forwards)
# the first bytes of the image formats Pillow reads that a client is likely to send, base64-encoded
_IMAGE_PREFIXES = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "Qk")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


@dataclass(eq=False)
class _Request:
    rows: list  # token id lists (seq_cls) or [3, H, W] pixel tensors (image_cls)
    adapter: Optional[LoadedAdapter]
    on_done: Callable[[Optional[torch.Tensor], Optional[BaseException]], None]
    logits: list = field(default_factory=list)  # per row, filled as its forward runs
    taken: int = 0  # rows handed to a forward so far
    finished: int = 0
    cancelled: bool = False
    done: bool = False

    @property
    def lora_name(self) -> str:
        return self.adapter.internal if self.adapter is not None else BASE


class ClassificationEngine(EngineQueue, LoraHost):
    """Batched classification over a transformers classifier with LoRA adapters (and their heads) in slots.

    Args:
        model: `AutoModelForSequenceClassification` (task seq_cls) or `AutoModelForImageClassification`
            (image_cls), eval mode, on its device; wrapped in a PeftModel when the first adapter arrives.
        processor: its tokenizer (seq_cls) or image processor (image_cls).
        task: "seq_cls" or "image_cls".
        max_batch_size: most rows in one forward.
        max_queue: requests waiting for their rows to run; more are refused with OverloadedError.
        max_adapters: adapter slots (LRU).
    """

    def __init__(self, model, processor, *, task: str, max_batch_size: int = 16, max_queue: int = 64,
                 max_adapters: int = 8) -> None:
        if task not in ("seq_cls", "image_cls"):
            raise ConfigError(f"`task` must be seq_cls or image_cls for a classification engine, got {task!r}.")
        self.base, self.processor, self.task = model.eval(), processor, task
        # the base's tensor shapes as loaded (a PeftModel renames the wrapped ones): adapters' heads must match
        self._shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        self.peft = None
        self._dormant: Optional[str] = None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        config = model.config
        self.labels = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        if task == "seq_cls":
            self.max_tokens = _max_tokens(model, processor)
            self.pad_id = processor.pad_token_id if processor.pad_token_id is not None else 0
            if getattr(config, "pad_token_id", None) is None:  # heads that pool the last real token look for it
                config.pad_token_id = self.pad_id
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.slots = AdapterSlots(self, max_adapters)
        self._model_lock = threading.RLock()
        self._cv = threading.Condition()
        self._pending: list[_Request] = []
        self._closed = False
        self.steps = self.rows_done = self.running = 0
        self.forward_rows: list[int] = []  # rows of the last forwards (kept short): what was batched together
        self.last_step = time.monotonic()
        self._stepping = False
        self._thread = threading.Thread(target=self._loop, name="peftray-classify", daemon=True)
        self._thread.start()

    # --- adapters (called by AdapterSlots) ------------------------------------------------------------
    def check_adapter(self, key: str, config, state: dict) -> None:
        """AdapterFormatError (naming `model`) unless `config` is a LoRA adapter of this task whose tensors fit."""
        from peftray.tuners.config import PeftType, TaskType

        has = f"task_type {config.task_type.value}" if config.task_type is not None else "no task_type"
        if self.task == "seq_cls" and config.task_type != TaskType.SEQ_CLS:
            raise AdapterFormatError(f"adapter {key!r} (the request's `model`) has {has}; a seq_cls deployment "
                                     "serves SEQ_CLS adapters (trained with task: seq_cls).")
        if self.task == "image_cls" and config.task_type is not None:
            raise AdapterFormatError(f"adapter {key!r} (the request's `model`) has {has}: a text adapter; an "
                                     "image_cls deployment serves adapters trained with task: image_cls.")
        if config.peft_type != PeftType.LORA:
            raise AdapterFormatError(f"adapter {key!r} (the request's `model`) is {config.peft_type.value}; "
                                     "classification deployments batch LoRA (and DoRA) adapters only.")
        check_modules(key, config, state, self.base, "text classifier" if self.task == "seq_cls" else "image classifier")
        self._check_head(key, state)

    def _check_head(self, key: str, state: dict) -> None:
        """The adapter's own head (its `modules_to_save` tensors) must have the base head's shape."""
        for name, tensor in state.items():
            if ".lora_" in name:
                continue
            path = name.removeprefix("base_model.model.").replace(".modules_to_save.", ".")
            if path in self._shapes and self._shapes[path] != tuple(tensor.shape):
                raise AdapterFormatError(
                    f"adapter {key!r} (the request's `model`) has `{path}` of shape {tuple(tensor.shape)} but this "
                    f"deployment's head has {self._shapes[path]} ({len(self.labels)} labels: "
                    f"{', '.join(self.labels[:8])}): it was trained for other labels or another base. Send it to a "
                    "deployment whose serve spec `labels` match its classes.")

    def prompt_tensors(self, config, state: dict):
        raise AdapterFormatError("prompt-learning adapters are not batched by classification deployments; serve a "
                                 "LoRA adapter.")

    def loaded_adapters(self) -> list[str]:
        return self.slots.keys()

    # --- inputs -------------------------------------------------------------------------------------------
    def encode(self, inputs: list[str]) -> tuple[list, int]:
        """(rows, tokens) for a request's `input`: token ids per text, or pixel values per base64 image.

        Raises:
            ConfigError naming `input`: an image sent to a text deployment or the reverse, undecodable base64 or
                image bytes, a text longer than the model reads, too many inputs.
        """
        if not inputs:
            raise field_error("input", "`input` is empty; send at least one text or image.")
        if len(inputs) > MAX_INPUTS:
            raise field_error("input", f"`input` holds {len(inputs)} items; at most {MAX_INPUTS} per request.")
        if self.task == "seq_cls":
            rows = [self._tokens(i, text) for i, text in enumerate(inputs)]
            return rows, sum(len(r) for r in rows)
        images = [_decode_image(i, value) for i, value in enumerate(inputs)]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return list(pixels), 0

    def _tokens(self, i: int, text: str) -> list[int]:
        if _looks_like_image(text):
            raise field_error("input", f"`input[{i}]` is an image (base64 / data: URI) but this deployment "
                                       "classifies text (task seq_cls); send images to an image_cls deployment.")
        if not text.strip():
            raise field_error("input", f"`input[{i}]` is empty; send text to classify.")
        ids = self.processor(text, truncation=False)["input_ids"]
        if len(ids) > self.max_tokens:
            raise field_error("input", f"`input[{i}]` has {len(ids)} tokens but this model reads at most "
                                       f"{self.max_tokens}; shorten it.")
        return ids

    def results(self, logits: torch.Tensor, top_k: Optional[int] = None) -> list[dict]:
        """Per input `{index, label, score, scores: [{label, score}]}`: probabilities (softmax; sigmoid for a
        multi-label head), `scores` best first, the `top_k` best (default all)."""
        probs = logits.float().sigmoid() if self.multi_label else logits.float().softmax(-1)
        k = min(top_k or len(self.labels), len(self.labels))
        out = []
        for i, row in enumerate(probs):
            values, ids = row.topk(k)
            scores = [{"label": self.labels[j], "score": float(v)} for v, j in zip(values.tolist(), ids.tolist())]
            out.append({"index": i, "label": scores[0]["label"], "score": scores[0]["score"], "scores": scores})
        return out

    # --- requests -----------------------------------------------------------------------------------------
    def submit(self, rows: list, adapter: Optional[LoadedAdapter],
               on_done: Callable[[Optional[torch.Tensor], Optional[BaseException]], None]) -> _Request:
        """Queue a request's rows; `on_done(logits [rows, labels] float32 on the CPU, error)` is called from the
        engine thread when its last row has run.

        Raises:
            OverloadedError: the queue is full or the engine is shutting down.
        """
        return self._enqueue(_Request(list(rows), adapter, on_done, logits=[None] * len(rows)))

    def cancel(self, request: _Request) -> None:
        request.cancelled = True

    def classify(self, inputs: list[str], adapter: Optional[LoadedAdapter] = None) -> torch.Tensor:
        """Blocking helper (tests, benchmarks): one request's logits [inputs, labels]."""
        return self.classify_many([(inputs, adapter)])[0]

    def classify_many(self, requests: list[tuple[list[str], Optional[LoadedAdapter]]]) -> list[torch.Tensor]:
        """Blocking helper: every request queued at once (so they share forwards); their logits in order."""
        encoded = [self.encode(inputs)[0] for inputs, _ in requests]
        return self._run_all([lambda on_done, rows=rows, adapter=adapter: self.submit(rows, adapter, on_done)
                              for rows, (_, adapter) in zip(encoded, requests)])

    # --- the loop -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                    self.last_step = time.monotonic()
                if self._closed:
                    break
                batch = self._take()
                self._stepping, self.running = True, len(batch)
            try:
                with self._model_lock, torch.inference_mode():
                    self.steps += 1  # counted before it runs: the caller its rows wake may read it
                    if batch:
                        self._forward(batch)
            except Exception as exc:  # noqa: BLE001 - a failed forward fails its requests, never the loop
                for request in {id(r): r for r, _ in batch}.values():
                    self._finish(request, None, exc)
            finally:
                self.last_step, self._stepping, self.running = time.monotonic(), False, 0
        with self._cv:
            left, self._pending = self._pending, []
        for request in left:
            self._finish(request, None, OverloadedError("the engine shut down; retry on another replica."))

    def _take(self) -> list[tuple[_Request, int]]:
        """(request, row) pairs for the next forward: pending rows in order, at most max_batch_size."""
        batch: list[tuple[_Request, int]] = []
        while self._pending and len(batch) < self.max_batch_size:
            request = self._pending[0]
            if request.cancelled or request.done:
                self._pending.pop(0)
                self._finish(request, None, None)
                continue
            n = min(self.max_batch_size - len(batch), len(request.rows) - request.taken)
            batch += [(request, request.taken + j) for j in range(n)]
            request.taken += n
            if request.taken == len(request.rows):
                self._pending.pop(0)
        return batch

    def _inputs(self, rows: list) -> dict:
        if self.task == "image_cls":
            return {"pixel_values": torch.stack(rows).to(self.device, self.dtype)}
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _forward(self, batch: list[tuple[_Request, int]]) -> None:
        inputs = self._inputs([request.rows[i] for request, i in batch])
        self.forward_rows = (self.forward_rows + [len(batch)])[-64:]
        if self.peft is not None:
            logits = self.peft(**inputs, adapter_names=[r.lora_name for r, _ in batch]).logits
        else:
            logits = self.base(**inputs).logits
        logits = logits.float().cpu()
        self.rows_done += len(batch)
        for (request, i), row in zip(batch, logits):
            request.logits[i] = row
            request.finished += 1
            if request.finished == len(request.rows):
                self._finish(request, torch.stack(request.logits), None)


def _max_tokens(model, tokenizer) -> int:
    limits = [int(getattr(model.config, "max_position_embeddings", 0) or 0),
              int(getattr(tokenizer, "model_max_length", 0) or 0)]
    limits = [n for n in limits if 0 < n < 1 << 30]
    return min(limits) if limits else 1 << 30


def _looks_like_image(text: str) -> bool:
    """A data: URI of an image, or base64 whose bytes start like a PNG, JPEG, GIF, WebP or BMP file."""
    head = text.lstrip()[:64]
    return head.startswith("data:image/") or (len(text) >= 64 and head.startswith(_IMAGE_PREFIXES)
                                               and bool(_BASE64.match(head)))


def _decode_image(i: int, value: str):
    """The RGB PIL image of one `input` item (base64, or a data: URI); ConfigError naming `input[i]`."""
    from PIL import Image, UnidentifiedImageError

    if value.startswith("data:"):
        meta, _, value = value.partition(",")
        if not meta.endswith(";base64"):
            raise field_error("input", f"`input[{i}]` is a data: URI without `;base64,` content ({meta[:40]!r}); "
                                       "send the image as data:image/png;base64,<...>.")
    try:
        data = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise field_error("input", f"`input[{i}]` is not base64 image data ({value[:30]!r}...): an image_cls "
                                   "deployment classifies images, each sent as base64 or a data: URI; text goes to "
                                   "a seq_cls deployment.") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise field_error("input", f"`input[{i}]` is base64 but not an image Pillow can decode ({exc}); send "
                                   "PNG, JPEG, GIF, WebP or BMP bytes as base64 (text goes to a seq_cls "
                                   "deployment).") from None
    return image.convert("RGB")
