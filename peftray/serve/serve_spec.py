"""`serve.yaml`: what one serving application runs (pydantic, `extra="forbid"`: a typo is an error, not a no-op).

    name: tiny                      # Serve application name (also the route prefix's owner)
    base_model: ./models/tiny-llama # folder or hub id; adapters must have been trained on it
    task: causal_lm                 # or text_to_image (a diffusers pipeline folder), seq_cls, image_cls (/v1/classify)
    adapters: ["*"]                 # what it may serve: "*", "name", "name@alias", "name/3"
    max_adapters_per_replica: 8     # adapter slots (LRU)
    max_batch_size: 16              # rows per forward pass
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from peftray.errors import ConfigError
from peftray.jobspec.load import pin_local_path

CLASSIFY_TASKS = ("seq_cls", "image_cls")  # the tasks served at POST /v1/classify


class Autoscaling(BaseModel):
    """Replica autoscaling (Ray Serve's `autoscaling_config`); replaces `num_replicas` when given."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0, description="fewest replicas")
    max_replicas: int = Field(2, ge=1, description="most replicas")
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests per replica to aim for")


class ServeConfig(BaseModel):
    """One Ray Serve application: a base model and the adapters it may serve."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("peftray", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$", description="Serve application name")
    base_model: str = Field(..., min_length=1, description="base model folder or hub id, loaded once per replica")
    task: Literal["causal_lm", "text_to_image", "seq_cls", "image_cls"] = Field(
        "causal_lm", description="causal_lm: /v1/completions and /v1/chat/completions on a transformers model; "
                                 "text_to_image: /v1/images/generations on a diffusers Stable Diffusion pipeline "
                                 "folder; seq_cls (text) and image_cls (images): /v1/classify on a transformers "
                                 "classifier")
    image_sizes: Optional[list[str]] = Field(None, description='text_to_image: the "WxH" sizes requests may ask for '
                                                               "(default: the pipeline's native size)")
    labels: Optional[list[str]] = Field(None, min_length=2, description="seq_cls / image_cls: class names in id "
                                        "order, for a base whose config does not name them (its id2label); the "
                                        "base's head is sized to them, as training does (default: the config's)")
    model_id: Optional[str] = Field(None, description="the base model's name in the API (default: base_model)")
    adapters: list[str] = Field(["*"], description='"*" (any adapter trained on base_model), "name", "name@alias", '
                                                   'or "name/3"')
    num_replicas: int = Field(1, ge=1, description="engine replicas (ignored when autoscaling is set)")
    autoscaling: Optional[Autoscaling] = None
    max_adapters_per_replica: int = Field(8, ge=1, description="adapter slots per replica (LRU eviction)")
    max_batch_size: int = Field(16, ge=1, description="most rows in one forward pass")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica works on at once")
    max_queued_requests: int = Field(64, ge=0, description="requests waiting for a replica; beyond: 429 with Retry-After")
    request_timeout_s: float = Field(60.0, gt=0, description="a request running longer is cut off (504)")
    stall_timeout_s: float = Field(120.0, gt=0, description="a replica whose engine has requests but finishes no "
                                   "step for this long fails its health check and is replaced")
    alias_poll_s: float = Field(2.0, gt=0, description="how often aliases are re-read: the promotion bound")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request gives none")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per engine replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per engine replica (device: cuda)")
    torch_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads per replica")
    http_port: Optional[int] = Field(None, ge=1, le=65535, description="Serve HTTP port (default: a free one)")
    api_key: Optional[str] = Field(None, min_length=8, description="bearer key (default $PEFTRAY_SERVE_API_KEY)")

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if not self.adapters:
            raise ValueError('adapters must list at least one entry; use ["*"] to serve every adapter of base_model')
        if self.image_sizes is not None and self.task != "text_to_image":
            raise ValueError("image_sizes is a text_to_image field; remove it or set task: text_to_image")
        if self.labels is not None and self.task not in CLASSIFY_TASKS:
            raise ValueError(f"labels is a seq_cls / image_cls field; remove it or set task to one of those "
                             f"(task is {self.task})")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct class names, got {self.labels}")
        if self.autoscaling and self.autoscaling.max_replicas < self.autoscaling.min_replicas:
            raise ValueError(f"autoscaling.max_replicas ({self.autoscaling.max_replicas}) must be >= "
                             f"autoscaling.min_replicas ({self.autoscaling.min_replicas})")
        return self

    @property
    def capacity(self) -> int:
        """Requests admitted at once: every replica's max_ongoing_requests plus max_queued_requests."""
        replicas = self.autoscaling.max_replicas if self.autoscaling else self.num_replicas
        return replicas * self.max_ongoing_requests + self.max_queued_requests

    @property
    def served_model_id(self) -> str:
        return self.model_id or self.base_model


def load_serve_config(source: str | Path | dict, overrides: dict | None = None) -> ServeConfig:
    """Read and validate a serve spec (a YAML path or a dict); relative `base_model` folders are made absolute.

    Raises:
        ConfigError: unreadable file or invalid fields (each named as written in the file).
    """
    where = "serve spec"
    if isinstance(source, dict):
        data = dict(source)
    else:
        where = str(source)
        try:
            data = yaml.safe_load(Path(source).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read serve spec {where}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {type(data).__name__}.")
        if "base_model" in data:  # a folder next to the spec, else one relative to the working directory
            data["base_model"] = pin_local_path(data["base_model"], (Path(source).parent, Path.cwd()))
    data.update(overrides or {})
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        errs = "; ".join(f"`{'.'.join(str(p) for p in e['loc']) or '(spec)'}`: {e['msg']} (got {e.get('input')!r})"
                         for e in exc.errors())
        raise ConfigError(f"{where}: {errs}. Fix the field(s) in the serve spec.") from None


def replica_placement(spec: ServeConfig, cuda_auto_dtype: str):
    """(device, torch dtype) a replica loads its base model with, after applying `torch_threads`: `device: auto`
    is CUDA when present, else the CPU; `dtype: auto` is `cuda_auto_dtype` (the task's usual half precision:
    bfloat16 for text, float16 for diffusion pipelines) on CUDA and float32 elsewhere."""
    import torch

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    device = spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    name = spec.dtype if spec.dtype != "auto" else (cuda_auto_dtype if device == "cuda" else "float32")
    return device, getattr(torch, name)
