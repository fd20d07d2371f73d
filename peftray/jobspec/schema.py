"""The job spec's pydantic models: one schema for the CLI, the service API and the trainer."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peftray.jobspec.gate import MetricGate
from peftray.tuners.methods import method_for_spec, spec_models
from peftray.tuners.tasks import TASKS

SLUG = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # no dots or slashes: names become S3 prefixes and MLflow names
_SLUG_HELP = "lowercase letters, digits, '-' and '_', starting with a letter or digit, at most 63 characters"


class _Strict(BaseModel):
    # allow_inf_nan=False: an inf/NaN learning rate or alpha would train into NaN weights and still "succeed"
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class BaseModelSpec(_Strict):
    """The frozen base model."""

    path: str = Field(description="hub id, local folder or s3:// URI of a transformers model folder")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the base weights are loaded in; auto = follow training.precision")

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


# ---- adapter methods and tasks: derived from the tuners' table, never listed here ----------------------------
_SPEC_MODELS = spec_models()
AdapterMethod = Annotated[Union[tuple(_SPEC_MODELS.values())], Field(discriminator="method")]
METHODS = tuple(_SPEC_MODELS)
PEFT_TYPES = {name: method_for_spec(name).peft_type for name in METHODS}
TASK_TYPES = {name: task.task_type for name, task in TASKS.items()}
# The spec models as the tuners define them, re-exported for callers that build spec sections in Python.
LoraMethod, DoraMethod, IA3Method = _SPEC_MODELS["lora"], _SPEC_MODELS["dora"], _SPEC_MODELS["ia3"]
PromptTuningMethod, PrefixTuningMethod = _SPEC_MODELS["prompt_tuning"], _SPEC_MODELS["prefix_tuning"]
PTuningMethod = _SPEC_MODELS["p_tuning"]
TEXT_ENCODER_FIELD = "text_encoder_target_modules"  # LoRA-family sections only (peftray.tuners.lora.spec)


def peft_config_kwargs(adapter: BaseModel, task: str, base_ref: str | None = None) -> dict[str, Any]:
    """The adapter section as keyword arguments of the matching HF-PEFT-style config class.

    The method's own section says how (`dora` becomes LoRA with `use_dora=True`); `task_type` is filled in
    from the job's task, and the task's own `modules_to_save` (image_cls: the classifier) join the section's.
    """
    kwargs = {**adapter.peft_kwargs(base_ref), "task_type": TASKS[task].task_type}
    if TASKS[task].modules_to_save:
        kwargs["modules_to_save"] = list(dict.fromkeys([*(kwargs.get("modules_to_save") or []),
                                                        *TASKS[task].modules_to_save]))
    return kwargs


# ---- data, training, resources, registry -----------------------------------------------------------------
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class DatasetSpec(_Strict):
    """Where the rows come from and how they become token ids and labels."""

    source: str = Field(description="local .json/.jsonl/.csv/.parquet file, s3:// URI, or hub dataset id; "
                                    "image_classification also takes a folder (local or s3://) of one folder per class")
    format: Literal["text", "instruction", "chat", "classification", "preference", "image_caption",
                    "image_classification"]
    subset: str | None = Field(None, description="hub dataset configuration name")
    split: str = Field("train", description="split to train on (hub datasets; local files have only 'train')")
    eval_split: str | None = Field(None, description="split to evaluate on; else eval_fraction of the rows")
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    eval_source: str | None = Field(None, description="a file (local or s3://) of eval rows in the same format; "
                                                      "replaces eval_fraction (files only)")
    max_rows: int | None = Field(None, gt=0, description="use only the first N rows (smoke runs)")
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    chosen_field: str = Field("chosen", description="preference: the preferred completion (string or messages)")
    rejected_field: str = Field("rejected", description="preference: the dispreferred completion")
    label_field: str = Field("label", description="classification, image_classification: the label column")
    labels: list[str] | None = Field(None, description="class names in label-id order (classification, "
                                                       "image_classification); default: the sorted labels")
    image_field: str = Field("image", description="image_caption, image_classification: the image path (relative "
                                                  "to the file), s3:// URI, data: URI or bytes column")
    caption_field: str = Field("caption", description="image_caption: the caption column")
    max_seq_len: int = Field(512, gt=0)
    max_prompt_len: int | None = Field(
        None, gt=0, description="preference: a prompt is cut to its last N tokens when prompt + completion is longer "
                                "than max_seq_len (TRL's max_prompt_length); then the completions are cut")
    packing: bool = Field(False, description="concatenate text rows into max_seq_len blocks (format text)")

    @property
    def reads_file(self) -> bool:
        """True when `source` names a file (local or s3://); False for a hub dataset id."""
        src = self.source
        return src.startswith(("s3://", "/", "./", "../", "file://")) or src.lower().endswith(DATA_FILE_SUFFIXES)

    @model_validator(mode="after")
    def _packing_text_only(self):
        if self.packing and self.format != "text":
            raise ValueError(f"packing applies to format 'text' only, got format '{self.format}'")
        if self.max_prompt_len is not None and self.max_prompt_len >= self.max_seq_len:
            raise ValueError(f"`dataset.max_prompt_len` ({self.max_prompt_len}) must be below `dataset.max_seq_len` "
                             f"({self.max_seq_len}), or no completion token would fit")
        return self


class TrainingSpec(_Strict):
    """The optimisation loop. Set `epochs` or `max_steps` (optimizer steps), not both."""

    epochs: int | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(8, gt=0, description="rows per worker per micro-batch")
    gradient_accumulation_steps: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    eval_every: int | None = Field(None, gt=0, description="evaluate every N steps (and always at the end)")
    checkpoint_every: int = Field(50, gt=0, description="checkpoint every N steps (and always at the end)")
    max_failures: int = Field(2, ge=0, description="worker failures survived by resuming from a checkpoint")
    objective: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description="what the loss learns: sft (demonstrations), dpo or orpo (preference pairs); the names "
                           "are those of peftray.train.objectives.OBJECTIVES (a test keeps them equal)")
    beta: float | None = Field(None, description="dpo: the KL strength (default 0.1); orpo: the odds-ratio weight "
                                                 "(default 0.1)")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="dpo: the loss on the reward margin")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo sigmoid: the share of pairs assumed flipped "
                                                                   "(conservative DPO)")
    snr_gamma: float | None = Field(None, gt=0, description="text_to_image: min-SNR-gamma loss weighting (5.0 is "
                                                             "the paper's choice); unset = plain MSE")
    reference: Literal["adapter_disabled", "precomputed"] = Field(
        "adapter_disabled", description="dpo: the reference policy is the base with the adapter switched off, "
                                        "run every step (adapter_disabled) or once before training (precomputed)")

    @model_validator(mode="after")
    def _epochs_or_steps(self):
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("can't provide both `training.epochs` and `training.max_steps`; choose one")
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"`training.beta` must be > 0, got {self.beta}. Set training.beta=0.1 or leave it out")
        if self.objective == "sft" and self.beta is not None:
            raise ValueError("`training.beta` applies to objective dpo or orpo, got objective 'sft'; remove "
                             "training.beta or set training.objective")
        if self.objective != "dpo" and (self.loss_type != "sigmoid" or self.reference != "adapter_disabled"
                                        or self.label_smoothing):
            raise ValueError(f"`training.loss_type`, `training.reference` and `training.label_smoothing` apply to "
                             f"objective dpo, got objective '{self.objective}'")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"`training.label_smoothing` applies to loss_type sigmoid, got '{self.loss_type}'")
        return self

    @property
    def preference_beta(self) -> float:
        """`beta`, or the objective's default (0.1 for dpo and orpo, as TRL)."""
        return self.beta if self.beta is not None else 0.1


class ResourcesSpec(_Strict):
    """Ray Train workers and what each one holds."""

    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    use_tpu: bool = False
    topology: str | None = Field(None, description="TPU slice topology, e.g. 2x2x1 (use_tpu)")
    accelerator_type: str | None = Field(None, description="e.g. A100, H100, TPU-V6E")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float | None = Field(None, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"

    @model_validator(mode="after")
    def _accelerators(self):
        if self.use_gpu and self.use_tpu:
            raise ValueError("use_gpu and use_tpu are exclusive; set one")
        if self.topology and not self.use_tpu:
            raise ValueError("topology needs use_tpu: true")
        if self.gpus_per_worker and not self.use_gpu:
            raise ValueError("gpus_per_worker needs use_gpu: true")
        return self


class PromoteSpec(_Strict):
    alias: str = Field(pattern=SLUG)
    gate: MetricGate | None = None


class RegistrySpec(_Strict):
    """Where the trained adapter is registered (MLflow model registry)."""

    model_name: str | None = Field(None, pattern=SLUG, description="registered model name; default = job name")
    tags: dict[str, str] = Field(default_factory=dict)
    promote: PromoteSpec | None = None


class JobSpec(_Strict):
    """A whole fine-tuning job. See the module docstring for an example."""

    name: str = Field(pattern=SLUG, description="job name; the same name resumes the same run")
    description: str | None = None
    base_model: BaseModelSpec
    task: Literal[tuple(TASKS)] = "causal_lm"  # type: ignore[valid-type]
    adapter: AdapterMethod = Field(default_factory=LoraMethod)
    quantization: Literal["4bit", "8bit"] | None = Field(None, description="quantize the frozen base (QLoRA)")
    dataset: DatasetSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    registry: RegistrySpec = Field(default_factory=RegistrySpec)

    @field_validator("base_model", mode="before")
    @classmethod
    def _path_shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v  # `base_model: ./tiny` is allowed

    @field_validator("adapter", mode="before")
    @classmethod
    def _method_shorthand(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get(TEXT_ENCODER_FIELD) is not None:
            method = v.get("method", "lora")
            model = _SPEC_MODELS.get(method)
            if model is not None and TEXT_ENCODER_FIELD not in model.model_fields:
                lora = [n for n, m in _SPEC_MODELS.items() if TEXT_ENCODER_FIELD in m.model_fields]
                raise ValueError(f"`adapter.{TEXT_ENCODER_FIELD}` applies to LoRA methods ({', '.join(lora)}), got "
                                 f"`adapter.method: {method}`; remove adapter.{TEXT_ENCODER_FIELD} or set "
                                 "adapter.method=lora")
        return {"method": v} if isinstance(v, str) else v  # `adapter: lora` = LoRA with defaults

    @model_validator(mode="after")
    def _cross_checks(self):
        formats = TASKS[self.task].dataset_formats
        if self.dataset.format not in formats:
            needs = [name for name, task in TASKS.items() if self.dataset.format in task.dataset_formats]
            which = f" (which needs task {' or '.join(needs)})" if needs else ""
            raise ValueError(f"task {self.task} needs dataset.format {' or '.join(map(repr, formats))}, "
                             f"got '{self.dataset.format}'{which}")
        preference = self.training.objective in ("dpo", "orpo")
        if preference != (self.dataset.format == "preference"):
            raise ValueError(f"`training.objective: {self.training.objective}` needs dataset.format "
                             f"'{'preference' if preference else 'text, instruction or chat'}', got "
                             f"'{self.dataset.format}'")
        if not TASKS[self.task].prompt_methods and not method_for_spec(self.adapter.method).adapts_weights:
            weight = [n for n in METHODS if method_for_spec(n).adapts_weights]
            raise ValueError(f"`task: {self.task}` trains weight adapters only ({', '.join(weight)}), got "
                             f"`adapter.method: {self.adapter.method}` (a prompt-learning method needs a token "
                             f"sequence to prepend to); set adapter.method=lora")
        if self.training.snr_gamma is not None and not TASKS[self.task].diffusion:
            raise ValueError(f"`training.snr_gamma` applies to task text_to_image, got task '{self.task}'")
        if self.text_encoder_targets and not TASKS[self.task].diffusion:
            raise ValueError(f"`adapter.{TEXT_ENCODER_FIELD}` applies to task text_to_image (the pipeline's text "
                             f"encoder), got task '{self.task}'; remove adapter.{TEXT_ENCODER_FIELD}")
        if self.quantization and self.resources.use_tpu:
            raise ValueError("quantization (bitsandbytes) is not supported on TPU; remove `quantization`")
        if self.quantization and not method_for_spec(self.adapter.method).adapts_weights:
            weight = [n for n in METHODS if method_for_spec(n).adapts_weights]
            raise ValueError(f"quantization needs a weight adapter ({', '.join(weight)}), got '{self.adapter.method}'")
        return self

    @property
    def method(self) -> str:
        """The adapter method name (`lora`, `dora`, `ia3`, `prompt_tuning`, `prefix_tuning`, `p_tuning`)."""
        return self.adapter.method

    @property
    def text_encoder_targets(self) -> list[str] | None:
        """`adapter.text_encoder_target_modules` (text_to_image, LoRA methods); None = frozen text encoder."""
        return getattr(self.adapter, TEXT_ENCODER_FIELD, None)

    @property
    def model_name(self) -> str:
        """The registered model name: `registry.model_name`, else the job name."""
        return self.registry.model_name or self.name

    def peft_kwargs(self, base_ref: str | None = None) -> dict[str, Any]:
        """Keyword arguments for the adapter's HF-PEFT-style config class (see `peft_config_kwargs`)."""
        return peft_config_kwargs(self.adapter, self.task, base_ref)

    def to_flat_params(self) -> dict[str, str]:
        """The whole spec flattened to `{"training.learning_rate": "0.0002", ...}` (MLflow params)."""
        flat: dict[str, str] = {}
        _flatten(self.model_dump(mode="json", exclude_none=True), "", flat)
        return flat

    def fingerprint(self) -> str:
        """sha256 of the spec as canonical JSON, `description` left out: with the owner and the job name, the
        identity of a run. Any other change (data, hyperparameters, base model) makes a different run."""
        data = self.model_dump(mode="json", exclude={"description"})
        if data["adapter"].get(TEXT_ENCODER_FIELD, 0) is None:
            del data["adapter"][TEXT_ENCODER_FIELD]  # unset: the fingerprint of specs written before the field
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
        return
    text = value if isinstance(value, str) else json.dumps(value)
    out[prefix] = text[:6000]  # MLflow's param value limit
