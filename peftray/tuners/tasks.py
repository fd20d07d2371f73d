"""THE table of tasks a job can train: the job spec's `task` -> PEFT task type, transformers head, data formats.

The job spec's `task` choices and the trainer's model head derive from it; a new task is one
`register_task(...)` here plus its data format and, where its loss differs, the trainer's step (image_cls
needed only its format: its loss and accuracy are seq_cls's classification path).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One task.

    Attributes:
        name: the job spec's `task` value, e.g. "causal_lm".
        task_type: PEFT's `task_type` (`TaskType` value) its adapters are saved with.
        auto_model: the transformers Auto class that loads its base model with the right head.
        dataset_formats: the `dataset.format`s whose rows it trains on.
        classification: rows carry one class label each (the head is sized from the label names; the eval
            reports accuracy) rather than next-token labels.
        diffusion: the base is a diffusers pipeline folder; the adapter goes on its UNet and the loss is the
            scheduler's noise-prediction loss (peftray.train.diffusion).
        image_processor: the base reads images through its image processor (preprocessor_config.json), not a
            tokenizer: rows become `pixel_values` resized and normalized as the processor says.
        modules_to_save: modules every adapter of this task trains in full and saves with it. HF PEFT adds the
            classifier itself for SEQ_CLS; it has no image-classification TaskType, so for ViT (as in its
            image-classification guide) the config names the head: `task_type` None, `modules_to_save: [classifier]`.
        prompt_methods: prompt-learning methods (prompt, prefix, P-tuning) apply; they prepend virtual tokens to a
            token sequence, which an image model or a UNet does not take.
    """

    name: str
    task_type: str | None
    auto_model: str
    dataset_formats: tuple[str, ...]
    classification: bool = False
    diffusion: bool = False
    image_processor: bool = False
    modules_to_save: tuple[str, ...] = ()
    prompt_methods: bool = True


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> None:
    if task.name in TASKS and TASKS[task.name] != task:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task


register_task(Task("causal_lm", "CAUSAL_LM", "AutoModelForCausalLM", ("text", "instruction", "chat", "preference")))
register_task(Task("seq_cls", "SEQ_CLS", "AutoModelForSequenceClassification", ("classification",),
                   classification=True))
register_task(Task("text_to_image", None, "UNet2DConditionModel", ("image_caption",), diffusion=True,
                   prompt_methods=False))
register_task(Task("image_cls", None, "AutoModelForImageClassification", ("image_classification",),
                   classification=True, image_processor=True, modules_to_save=("classifier",), prompt_methods=False))
