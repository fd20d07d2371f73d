"""The job spec's pydantic models: one schema for the CLI, the service API and the trainer."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


# ---- adapter methods: keys are HF PEFT's config fields --------------------------------------------------
class _LoraFields(_Strict):
    r: int = Field(8, gt=0, description="rank of the update")
    lora_alpha: float = Field(8, gt=0, description="scaling numerator: scale = lora_alpha / r")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(
        None, description="module names, 'all-linear', or a regex string; None = the model type's default")
    exclude_modules: list[str] | str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    fan_in_fan_out: bool = False


class LoraMethod(_LoraFields):
    """LoRA (`method: lora`); `use_dora: true` turns it into DoRA."""

    method: Literal["lora"] = "lora"
    use_dora: bool = False


class DoraMethod(_LoraFields):
    """DoRA (`method: dora`): LoRA with a learned magnitude vector (HF PEFT: LoRA with use_dora=True)."""

    method: Literal["dora"] = "dora"


class IA3Method(_Strict):
    """IA3 (`method: ia3`): learned rescaling vectors."""

    method: Literal["ia3"] = "ia3"
    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True


class PromptTuningMethod(_Strict):
    """Prompt tuning (`method: prompt_tuning`): learned virtual-token embeddings."""

    method: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(8, gt=0)
    prompt_tuning_init: Literal["RANDOM", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None

    @model_validator(mode="after")
    def _text_init(self):
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init TEXT needs prompt_tuning_init_text")
        return self


class PrefixTuningMethod(_Strict):
    """Prefix tuning (`method: prefix_tuning`): learned key/value prefixes in every layer."""

    method: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(8, gt=0)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(None, gt=0)


class PTuningMethod(_Strict):
    """P-tuning (`method: p_tuning`): virtual tokens produced by a small prompt encoder."""

    method: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(8, gt=0)
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = Field(None, gt=0)
    encoder_num_layers: int = Field(2, gt=0)
    encoder_dropout: float = Field(0.0, ge=0, lt=1)


AdapterMethod = Annotated[
    Union[LoraMethod, DoraMethod, IA3Method, PromptTuningMethod, PrefixTuningMethod, PTuningMethod],
    Field(discriminator="method"),
]
METHODS = ("lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning")
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING",
              "prefix_tuning": "PREFIX_TUNING", "p_tuning": "P_TUNING"}
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


def peft_config_kwargs(adapter: BaseModel, task: str) -> dict[str, Any]:
    """The adapter section as keyword arguments of the matching HF-PEFT-style config class.

    `dora` becomes LoRA with `use_dora=True`; `task_type` is filled in from the job's task.
    """
    kwargs = adapter.model_dump(exclude={"method"}, exclude_none=True)
    if adapter.method == "dora":
        kwargs["use_dora"] = True
    kwargs["task_type"] = TASK_TYPES[task]
    return kwargs


# ---- data, training, resources, registry -----------------------------------------------------------------
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class DatasetSpec(_Strict):
    """Where the rows come from and how they become token ids and labels."""

    source: str = Field(description="local .json/.jsonl/.csv/.parquet file, s3:// URI, or hub dataset id")
    format: Literal["text", "instruction", "chat", "classification"]
    subset: str | None = Field(None, description="hub dataset configuration name")
    split: str = Field("train", description="split to train on (hub datasets; local files have only 'train')")
    eval_split: str | None = Field(None, description="split to evaluate on; else eval_fraction of the rows")
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    max_rows: int | None = Field(None, gt=0, description="use only the first N rows (smoke runs)")
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    label_field: str = "label"
    labels: list[str] | None = Field(None, description="class names in label-id order (classification)")
    max_seq_len: int = Field(512, gt=0)
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

    @model_validator(mode="after")
    def _epochs_or_steps(self):
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("can't provide both `training.epochs` and `training.max_steps`; choose one")
        return self


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


class GateSpec(_Strict):
    """A promotion gate: the version's metric must pass a threshold or be no worse than the current holder."""

    metric: str
    mode: Literal["min", "max"] = "min"
    threshold: float | None = None
    no_worse_than_current: bool = False

    @model_validator(mode="after")
    def _one_rule(self):
        if (self.threshold is None) == (not self.no_worse_than_current):
            raise ValueError("set exactly one of `threshold` or `no_worse_than_current: true`")
        return self


class PromoteSpec(_Strict):
    alias: str = Field(pattern=SLUG)
    gate: GateSpec | None = None


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
    task: Literal["causal_lm", "seq_cls"] = "causal_lm"
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
        return {"method": v} if isinstance(v, str) else v  # `adapter: lora` = LoRA with defaults

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.task == "seq_cls" and self.dataset.format != "classification":
            raise ValueError(f"task seq_cls needs dataset.format 'classification', got '{self.dataset.format}'")
        if self.task == "causal_lm" and self.dataset.format == "classification":
            raise ValueError("dataset.format 'classification' needs task 'seq_cls'")
        if self.quantization and self.resources.use_tpu:
            raise ValueError("quantization (bitsandbytes) is not supported on TPU; remove `quantization`")
        if self.quantization and self.adapter.method not in ("lora", "dora", "ia3"):
            raise ValueError(f"quantization needs a weight adapter (lora, dora, ia3), got '{self.adapter.method}'")
        return self

    @property
    def method(self) -> str:
        """The adapter method name (`lora`, `dora`, `ia3`, `prompt_tuning`, `prefix_tuning`, `p_tuning`)."""
        return self.adapter.method

    @property
    def model_name(self) -> str:
        """The registered model name: `registry.model_name`, else the job name."""
        return self.registry.model_name or self.name

    def peft_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the adapter's HF-PEFT-style config class (see `peft_config_kwargs`)."""
        return peft_config_kwargs(self.adapter, self.task)

    def to_flat_params(self) -> dict[str, str]:
        """The whole spec flattened to `{"training.learning_rate": "0.0002", ...}` (MLflow params)."""
        flat: dict[str, str] = {}
        _flatten(self.model_dump(mode="json", exclude_none=True), "", flat)
        return flat

    def fingerprint(self) -> str:
        """sha256 of the spec as canonical JSON, `description` left out: with the owner and the job name, the
        identity of a run. Any other change (data, hyperparameters, base model) makes a different run."""
        data = self.model_dump(mode="json", exclude={"description"})
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


_METHOD_MODELS = {"lora": LoraMethod, "dora": DoraMethod, "ia3": IA3Method, "prompt_tuning": PromptTuningMethod,
                  "prefix_tuning": PrefixTuningMethod, "p_tuning": PTuningMethod}
