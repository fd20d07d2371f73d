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

from peftray.jobspec.gate import MetricGate
from peftray.jobspec.load import format_validation_error, load_spec
from peftray.jobspec.schema import (
    METHODS, PEFT_TYPES, SLUG, TASK_TYPES, AdapterMethod, BaseModelSpec, DatasetSpec, DoraMethod,
    IA3Method, JobSpec, LoraMethod, PrefixTuningMethod, PromoteSpec, PromptTuningMethod, PTuningMethod,
    RegistrySpec, ResourcesSpec, TrainingSpec, peft_config_kwargs,
)

__all__ = [
    "METHODS", "PEFT_TYPES", "SLUG", "TASK_TYPES", "AdapterMethod", "BaseModelSpec", "DatasetSpec", "DoraMethod",
    "IA3Method", "JobSpec", "LoraMethod", "MetricGate", "PTuningMethod", "PrefixTuningMethod", "PromoteSpec",
    "PromptTuningMethod", "RegistrySpec", "ResourcesSpec", "TrainingSpec", "format_validation_error", "load_spec",
    "peft_config_kwargs",
]
