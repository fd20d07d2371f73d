"""The job spec: one pydantic schema for the CLI, the service API and the trainer.

A spec arrives from a YAML file (`peftray train job.yaml`) or over REST, so it is data only: every model
forbids unknown fields, and no field names a command, a Python dotpath or a Ray runtime_env.

    name: tiny-lora
    base_model: {path: ./models/tiny-llama}
    task: causal_lm
    adapter: {method: lora, r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}
    dataset: {source: jobs/data/tiny_instruct.jsonl, format: instruction, max_seq_len: 128}
    training: {max_steps: 20, learning_rate: 1e-3, batch_size: 4}
    resources: {num_workers: 2}
    registry: {model_name: tiny-lora, tags: {team: demo}}

`load_spec(path_or_text, ["training.max_steps=5"])` applies `key=value` overrides (values parsed as YAML
scalars) and raises `ConfigError` naming the field as the user wrote it, the value and the allowed values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftray.errors import ConfigError

SLUG = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # no dots or slashes: names become S3 prefixes and MLflow names
_SLUG_HELP = "lowercase letters, digits, '-' and '_', starting with a letter or digit, at most 63 characters"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
        return
    text = value if isinstance(value, str) else json.dumps(value)
    out[prefix] = text[:6000]  # MLflow's param value limit


# ---- loading ----------------------------------------------------------------------------------------------
def load_spec(path_or_text: str | Path | Mapping, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load and validate a job spec.

    Args:
        path_or_text: a YAML file path, an `s3://` URI of one, YAML text, or an already-parsed mapping.
        overrides: `a.b=value` strings; each value is parsed as a YAML scalar (`5`, `1e-3`, `true`, `[a, b]`).

    Returns:
        The validated `JobSpec`.

    Raises:
        ConfigError: unreadable file, bad YAML, a bad override, or a field that fails validation; the
            message names the field path as written, the value received and the allowed values.
    """
    data = _read(path_or_text)
    for item in overrides:
        _apply_override(data, item)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def _read(src: str | Path | Mapping) -> dict[str, Any]:
    if isinstance(src, Mapping):
        return json.loads(json.dumps(dict(src)))  # a deep copy that overrides may change
    text = str(src)
    if isinstance(src, Path) or ("\n" not in text and (text.endswith((".yaml", ".yml", ".json"))
                                                       or text.startswith("s3://"))):
        text = _read_file(text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"job spec is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"job spec must be a YAML mapping of fields, got {type(data).__name__}: {text[:80]!r}")
    return data


def _read_file(path: str) -> str:
    if path.startswith("s3://"):
        from peftray.config import load_config

        fs = load_config().s3fs()
        try:
            return fs.cat_file(path[len("s3://"):]).decode()
        except FileNotFoundError:
            raise ConfigError(f"job spec {path} does not exist in object storage") from None
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"job spec file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read job spec file {path}: {exc}") from None


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key=value, e.g. training.max_steps=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if isinstance(child, str) and i == 0 and part in ("base_model", "adapter"):
            child = node[part] = {"path" if part == "base_model" else "method": child}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: `{'.'.join(parts[:i + 1])}` is {child!r}, not a section")
        node = child
    node[parts[-1]] = value


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `field.path`: what is wrong, the value received, the allowed values."""
    lines = [_describe(err) for err in exc.errors(include_url=False)]
    head = "invalid job spec" if len(lines) == 1 else f"invalid job spec ({len(lines)} problems)"
    return head + ":\n  " + "\n  ".join(lines)


def _user_path(loc: tuple) -> list[str]:
    # pydantic puts the union tag into the location (adapter.lora.r); the user wrote adapter.r
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] == "adapter" and parts[1] in METHODS:
        del parts[1]
    return [p for p in parts if not p.startswith(("function-", "list[", "literal[", "str", "int"))] or parts


def _describe(err: dict[str, Any]) -> str:
    path = ".".join(_user_path(err["loc"]))
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    shown = json.dumps(value, default=str)[:120]
    if kind == "extra_forbidden":
        allowed = _allowed_fields(err["loc"][:-1])
        return f"unknown field `{path}` (value {shown}); allowed fields here: {', '.join(allowed)}"
    if kind == "missing":
        return f"`{path}` is required; add it to the job spec"
    if kind == "union_tag_invalid":
        return f"`{path}.method` must be one of {', '.join(METHODS)}; got {json.dumps(ctx.get('tag'))}"
    if kind == "union_tag_not_found":
        return f"`{path}.method` is required; one of {', '.join(METHODS)}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        msg = f"must be a safe name ({_SLUG_HELP})"
    where = f"`{path}`" if path else "job spec"
    if isinstance(value, dict):  # a cross-field check: its message already names the fields
        return f"{where}: {msg}"
    return f"{where}: {msg}; got {shown}. Set {path} in the job spec or pass {path}=..."


def _allowed_fields(loc: tuple) -> list[str]:
    model: Any = JobSpec
    parts = [str(p) for p in loc]
    i = 0
    while i < len(parts):
        if model is JobSpec and parts[i] == "adapter":
            if i + 1 < len(parts) and parts[i + 1] in _METHOD_MODELS:
                model, i = _METHOD_MODELS[parts[i + 1]], i + 2
                continue
            return ["method"]
        field = model.model_fields.get(parts[i])
        model = _model_of(field.annotation) if field else None
        if model is None:
            return []
        i += 1
    return sorted(model.model_fields)


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


_METHOD_MODELS = {"lora": LoraMethod, "dora": DoraMethod, "ia3": IA3Method, "prompt_tuning": PromptTuningMethod,
                  "prefix_tuning": PrefixTuningMethod, "p_tuning": PTuningMethod}
