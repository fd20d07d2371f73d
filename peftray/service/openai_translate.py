"""`POST /v1/fine_tuning/jobs` bodies to peftray job specs.

| OpenAI | peftray job spec |
|---|---|
| `model` (a name the admin configured) | `base_model.path` (`peftray service up --base-model NAME=PATH_OR_URI`) |
| `training_file`, `validation_file` | `dataset.source`, `dataset.eval_source` (the converted rows; no eval without one) |
| `method.type: supervised` / `dpo` | `dataset.format: chat` / `preference`, `training.objective: sft` / `dpo` |
| `n_epochs` (`auto` = 3) | `training.epochs`, one checkpoint per epoch |
| `batch_size` (`auto` = min(8, training rows)) | `training.batch_size` |
| `learning_rate_multiplier` (`auto` = 1) | `training.learning_rate` = multiplier x 2e-4 |
| `beta` (`auto` = 0.1, dpo only) | `training.beta` |
| `seed` (default 42) | `training.seed` |
| the admin's `PEFTRAY_SERVICE_FT_ADAPTER` (default LoRA) | `adapter` |
| `extra_body={"peftray": {...}}` | merged into the spec: `description`, `adapter`, `quantization`, `training`, `resources`, and `dataset.max_seq_len`, `max_prompt_len`, `max_rows`, `eval_fraction` |

The job's name and adapter name are its `ftjob-...` id, so each job is its own run and its own adapter.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peftray.errors import ConfigError
from peftray.registry.finetuned import FT_TAG, fine_tuned_name
from peftray.service.openai_store import FileRecord
from peftray.service.openai_validate import PREFERENCE, SUPERVISED

DEFAULT_LEARNING_RATE = 2e-4
AUTO_EPOCHS, AUTO_BATCH_SIZE, AUTO_BETA = 3, 8, 0.1
# what `extra_body.peftray` may set; the rest (name, data, base model, registry) follows from the request
SETTABLE = {"description": None, "adapter": None, "quantization": None, "training": None, "resources": None,
            "dataset": {"max_seq_len", "max_prompt_len", "max_rows", "eval_fraction"}}
Auto = Literal["auto"]
# pydantic names the union member in an error's location (`n_epochs.literal['auto']`); OpenAI's param has none
_UNION_TAG = re.compile(r"^(literal\[.*\]|int|float|str|bool|none|list\[.*\]|dict\[.*\])$")


class BodyError(ConfigError):
    """A request field that is wrong: 400 with OpenAI's `param` naming it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    n_epochs: Union[Auto, int] = Field("auto", description="passes over the training file")
    batch_size: Union[Auto, int] = Field("auto", description="rows per step per worker")
    learning_rate_multiplier: Union[Auto, float] = Field("auto", description="times the default 2e-4")
    beta: Union[Auto, float, None] = Field(None, description="dpo: the KL strength")


class MethodSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"]
    supervised: MethodSection | None = None
    dpo: MethodSection | None = None


class CreateJob(BaseModel):
    """The body of `POST /v1/fine_tuning/jobs` (unknown fields are refused, naming them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[Any] | None = Field(None, max_length=0, description="not supported: must be empty")
    peftray: dict[str, Any] | None = None


def parse_create(data: Any) -> CreateJob:
    """Validate a request body. Raises BodyError naming the first bad field."""
    try:
        return CreateJob.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not _UNION_TAG.match(str(p))) or None
        raise BodyError(f"`{param}`: {first['msg']} (got {str(first.get('input'))[:80]!r})", param) from None


def method_of(body: CreateJob) -> tuple[str, Hyperparameters]:
    """(supervised | dpo, its hyperparameters) from `method` or the older top-level `hyperparameters`."""
    if body.method is None:
        return "supervised", body.hyperparameters or Hyperparameters()
    section = getattr(body.method, body.method.type)
    if body.hyperparameters is not None:
        raise BodyError("give hyperparameters in `method.<type>.hyperparameters` or the top-level "
                        "`hyperparameters`, not both", "hyperparameters")
    hp = section.hyperparameters if section else Hyperparameters()
    return body.method.type, hp


def build_spec(body: CreateJob, job_id: str, owner: str, base_models: dict[str, str], adapter: dict[str, Any],
               train: FileRecord, valid: FileRecord | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(job spec as a mapping, what the job object echoes). Raises BodyError naming the field."""
    if body.model not in base_models:
        known = ", ".join(sorted(base_models)) or "none (the admin sets them: peftray service up --base-model)"
        raise BodyError(f"`model` {body.model!r} is not a base model of this service; it knows: {known}", "model")
    kind, hp = method_of(body)
    want = PREFERENCE if kind == "dpo" else SUPERVISED
    for param, record in (("training_file", train), ("validation_file", valid)):
        if record is not None and record.kind != want:
            raise BodyError(f"`{param}` {record.id} holds {record.kind} rows, but method {kind} needs "
                            f"{want} rows", param)
    if kind != "dpo" and hp.beta is not None:
        raise BodyError("`beta` applies to method dpo", f"method.{kind}.hyperparameters.beta")
    extra = _checked_extra(body.peftray or {})
    epochs = AUTO_EPOCHS if hp.n_epochs == "auto" else hp.n_epochs
    batch = min(AUTO_BATCH_SIZE, train.rows) if hp.batch_size == "auto" else hp.batch_size
    mult = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
    training: dict[str, Any] = {"epochs": epochs, "batch_size": batch, "learning_rate": DEFAULT_LEARNING_RATE * mult,
                                "seed": 42 if body.seed is None else body.seed}
    if kind == "dpo":
        training.update(objective="dpo", beta=AUTO_BETA if hp.beta in (None, "auto") else hp.beta)
    dataset = {"source": train.train_uri, "format": want, "eval_fraction": 0.0}
    if valid is not None:
        dataset["eval_source"] = valid.train_uri
    ft_name = fine_tuned_name(body.model, owner, body.suffix, job_id)
    spec = {"name": job_id, "description": f"OpenAI fine-tuning job {job_id}", "base_model": {"path": base_models[body.model]},
            "adapter": dict(adapter), "dataset": dataset, "training": training,
            "registry": {"model_name": job_id, "tags": {FT_TAG: ft_name, "openai.job": job_id}}}
    _merge(spec, extra, explicit_epochs=hp.n_epochs != "auto")
    workers = int(spec.get("resources", {}).get("num_workers", 1))
    spec["training"].setdefault("checkpoint_every", max(1, math.ceil(train.rows / (spec["training"]["batch_size"] * workers))))
    hps = {"n_epochs": spec["training"].get("epochs") or "auto", "batch_size": spec["training"]["batch_size"],
           "learning_rate_multiplier": mult}
    if kind == "dpo":
        hps["beta"] = spec["training"]["beta"]
    echo = {"model": body.model, "training_file": train.id, "validation_file": valid.id if valid else None,
            "suffix": body.suffix, "seed": training["seed"], "metadata": body.metadata, "hyperparameters": hps,
            "method": {"type": kind, kind: {"hyperparameters": hps}}, "fine_tuned_model": ft_name}
    return spec, echo


def _checked_extra(extra: dict[str, Any]) -> dict[str, Any]:
    from peftray.service.intake import reject_execution_keys

    for key, value in extra.items():
        if key not in SETTABLE:
            raise BodyError(f"`peftray.{key}` may not be set through the OpenAI API; settable: "
                            f"{', '.join(SETTABLE)}", f"peftray.{key}")
        allowed = SETTABLE[key]
        if allowed is not None:
            if not isinstance(value, dict) or set(value) - allowed:
                raise BodyError(f"`peftray.{key}` may set only {', '.join(sorted(allowed))}", f"peftray.{key}")
    reject_execution_keys(extra, "peftray")
    return extra


def _merge(spec: dict[str, Any], extra: dict[str, Any], explicit_epochs: bool) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict) and key != "adapter":
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    training = spec["training"]
    if training.get("max_steps") is not None and not explicit_epochs:
        training.pop("epochs", None)  # `n_epochs: auto` gives way to the caller's own max_steps
