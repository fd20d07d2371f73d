"""peftray: parameter-efficient fine-tuning jobs on Ray.

The public Python API is re-exported here; everything else may change between releases.
Importing peftray does not start or contact Ray, MLflow or S3.
"""

from __future__ import annotations

__version__ = "0.1.0"

# The PEFT API is imported on first use (PEP 562), so `import peftray` (e.g. by the CLI) does not load torch.
_LAZY = {
    "read_adapter": "peftray.adapters", "write_adapter": "peftray.adapters",
    "JobSpec": "peftray.jobspec", "load_spec": "peftray.jobspec", "run_job": "peftray.train", "TrainResult": "peftray.train",
    # from task_models, so that every task subclass is defined when they are used
    "PeftModel": "peftray.task_models", "get_peft_model": "peftray.task_models", "peft_trainer": "peftray.hf_trainer",
    **{name: "peftray.task_models" for name in (
        "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
        "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification")},
    **{name: "peftray.tuners" for name in (
        "IA3Config", "LoraConfig", "PeftConfig", "PeftType", "PrefixTuningConfig", "PromptEncoderConfig",
        "PromptTuningConfig", "PromptTuningInit", "TaskType", "register_peft_method")},
}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    # any registered method's config class (`LNTuningConfig`), from the tuners' table (torch-free)
    from peftray.tuners.methods import class_attributes

    return class_attributes(__name__, ("config",), table_module="peftray.tuners")(name)


__all__ = [
    "IA3Config", "JobSpec", "LoraConfig", "PeftConfig", "PeftModel", "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftType", "PrefixTuningConfig",
    "PromptEncoderConfig", "PromptTuningConfig", "PromptTuningInit", "TaskType", "TrainResult", "__version__",
    "get_peft_model", "load_spec", "peft_trainer", "read_adapter", "register_peft_method", "run_job", "write_adapter",
]
