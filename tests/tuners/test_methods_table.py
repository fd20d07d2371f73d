"""Every registered method and task agrees with the job spec, its config class and its tuner.

The tuners' tables are the only lists of methods and tasks; the job spec, the trainer and the registry derive
from them. This walks each entry, so a method added by one folder and one registration line is checked whole.
"""

from __future__ import annotations

import dataclasses

import diffusers
import pytest
import torch
import transformers

from peftray.jobspec import METHODS, PEFT_TYPES, TASK_TYPES, JobSpec, load_spec
from peftray.registry.validate import method_of
from peftray.task_models import TASK_CLASSES, get_peft_model
from peftray.tuners.config import TaskType
from peftray.tuners.methods import method_entry, method_for_spec, registered_methods, spec_models
from peftray.tuners.tasks import TASKS

_BASE = {"name": "t", "base_model": "./m", "dataset": {"source": "d.jsonl", "format": "text"}}


def test_the_spec_lists_exactly_the_registered_methods():
    assert set(METHODS) == set(spec_models())
    assert {PEFT_TYPES[name] for name in METHODS} <= set(registered_methods())
    # every registered method is trainable from a job spec
    assert set(registered_methods()) == {method_for_spec(name).peft_type for name in METHODS}


@pytest.mark.parametrize("spec_method", list(spec_models()))
def test_each_spec_method_builds_its_config_and_its_tuner_trains(spec_method, llama):
    entry = method_for_spec(spec_method)
    spec = load_spec({**_BASE, "adapter": {"method": spec_method}})
    assert spec.adapter.method == spec_method and isinstance(spec.adapter, spec_models()[spec_method])
    config = entry.config_cls(**spec.peft_kwargs())
    assert config.peft_type == entry.peft_type and config.task_type == TaskType.CAUSAL_LM
    # the saved config names the spec method back (`dora` is LoRA with use_dora)
    assert method_of(config.to_dict()) == spec_method
    assert method_entry(entry.peft_type).model_cls.__module__.startswith("peftray.tuners.")
    torch.manual_seed(0)
    model = get_peft_model(llama(), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, f"{spec_method}: the tuner made nothing trainable"
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize("peft_type", registered_methods())
def test_serving_refuses_exactly_the_methods_the_table_says_it_does_not_batch(peft_type):
    from types import SimpleNamespace

    from peftray.errors import ConfigError
    from peftray.serve.watch import ModelResolver

    from peftray.registry.types import AdapterVersion

    entry = method_entry(peft_type)
    resolver = ModelResolver(SimpleNamespace(base_model="./m", served_model_id="m", task="causal_lm"),
                             registry=object())
    spec_name = _spec_names_of(entry)[0]

    def version(tagged_type):
        return AdapterVersion(name="a", version=1, source="mlflow-artifacts:/x", run_id=None, base_model=None,
                              base_revision=None, method=spec_name, rank=None, target_modules=[], metrics={},
                              tags={}, aliases=[], files={}, peft_type=tagged_type)

    # by the version's peft_type tag, and by its method tag alone (versions registered before that tag)
    for av in (version(peft_type), version(None)):
        if entry.serving is None:
            with pytest.raises(ConfigError, match=f"is {peft_type}, which this server does not batch; merge it"):
                resolver._target("a/1", av)
        else:
            assert resolver._target("a/1", av).key == "a/1"


def _spec_names_of(entry):
    return [name for name, spec in spec_models().items() if spec in entry.specs]


def test_each_method_class_is_public_by_its_name():
    import peftray
    import peftray.tuners

    for peft_type in registered_methods():
        entry = method_entry(peft_type)
        assert getattr(peftray, entry.config_cls.__name__) is entry.config_cls
        assert getattr(peftray.tuners, entry.config_cls.__name__) is entry.config_cls
        assert getattr(peftray.tuners, entry.model_name) is entry.model_cls


def test_spec_fields_are_config_fields():
    # a spec key that the config class does not have would be dropped or refused when building it
    for name, model in spec_models().items():
        fields = {f.name for f in dataclasses.fields(method_for_spec(name).config_cls)}
        assert set(model.model_fields) - {"method"} - model.spec_only_fields <= fields, name


@pytest.mark.parametrize("task_name", list(TASKS))
def test_each_task_has_a_peft_task_type_a_head_and_formats_the_spec_accepts(task_name):
    task = TASKS[task_name]
    assert TASK_TYPES[task_name] == task.task_type
    if task.task_type is None:
        # no PEFT TaskType: diffusers saves a UNet's LoRA config without one, and HF PEFT has none for image
        # classification (its ViT guide names the head in modules_to_save instead)
        assert task.diffusion or task.modules_to_save
    else:
        assert TaskType(task.task_type) in TASK_CLASSES
    assert hasattr(diffusers if task.diffusion else transformers, task.auto_model)
    for fmt in task.dataset_formats:
        objective = {"training": {"objective": "dpo"}} if fmt == "preference" else {}  # pairs need a pair objective
        spec = JobSpec.model_validate({**_BASE, "task": task_name, "dataset": {"source": "d", "format": fmt},
                                       **objective})
        assert spec.peft_kwargs()["task_type"] == task.task_type
        assert set(task.modules_to_save) <= set(spec.peft_kwargs().get("modules_to_save") or [])
        for method in METHODS:  # prompt-learning methods only where the task takes them
            data = {**_BASE, "task": task_name, "dataset": {"source": "d", "format": fmt}, **objective,
                    "adapter": {"method": method}}
            if task.prompt_methods or method_for_spec(method).adapts_weights:
                JobSpec.model_validate(data)
            else:
                with pytest.raises(ValueError, match=f"`task: {task_name}` trains weight adapters only"):
                    JobSpec.model_validate(data)
    others = {f for t in TASKS.values() if t is not task for f in t.dataset_formats} - set(task.dataset_formats)
    for fmt in others:
        with pytest.raises(ValueError, match=f"task {task_name} needs dataset.format"):
            JobSpec.model_validate({**_BASE, "task": task_name, "dataset": {"source": "d", "format": fmt}})
