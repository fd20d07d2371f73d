"""Wrong task/base/format/method combinations around image_cls are refused before training, with errors that
name the field as written and say what fits."""

from __future__ import annotations

import pytest

from peftray.data import prepare_data
from peftray.errors import ConfigError
from peftray.jobspec import load_spec
from peftray.train.model import tokenizer_and_data

SPEC = "jobs/tiny-vit-lora.yaml"


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_prompt_learning_methods_are_refused_for_image_tasks(method):
    with pytest.raises(ConfigError, match=rf"`task: image_cls` trains weight adapters only \(lora, dora, ia3[^)]*\), "
                                          rf"got `adapter.method: {method}`"):
        load_spec(SPEC, [f"adapter={{method: {method}}}"])
    with pytest.raises(ConfigError, match=rf"`task: text_to_image` trains weight adapters only .* {method}"):
        load_spec("jobs/tiny-sd-lora.yaml", [f"adapter={{method: {method}}}"])


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_weight_methods_get_the_classifier_in_modules_to_save(method):
    spec = load_spec(SPEC, [f"adapter={{method: {method}, modules_to_save: [extra]}}"])
    kwargs = spec.peft_kwargs()
    assert kwargs["task_type"] is None and kwargs["modules_to_save"] == ["extra", "classifier"]
    assert load_spec(SPEC, [f"adapter={{method: {method}, modules_to_save: [classifier]}}"]).peft_kwargs()[
        "modules_to_save"] == ["classifier"]  # named once


def test_image_formats_and_text_tasks_are_refused_together():
    with pytest.raises(ConfigError, match="task causal_lm needs dataset.format .* got 'image_classification' "
                                          r"\(which needs task image_cls\)"):
        load_spec("jobs/tiny-lora-instruct.yaml", ["dataset.format=image_classification"])
    with pytest.raises(ConfigError, match="task image_cls needs dataset.format 'image_classification', got 'text'"):
        load_spec(SPEC, ["dataset.format=text"])
    with pytest.raises(ConfigError, match="task image_cls needs dataset.format .* got 'image_caption' "
                                          r"\(which needs task text_to_image\)"):
        load_spec(SPEC, ["dataset.format=image_caption"])
    with pytest.raises(ConfigError, match="needs the model's image processor; use task image_cls"):
        prepare_data(load_spec(SPEC), None)


def test_task_and_base_mismatches_are_refused(tiny_vit, tiny_model):
    spec = load_spec(SPEC, [f"base_model.path={tiny_model}"])
    with pytest.raises(ConfigError, match=r"`task: image_cls` needs a base model that AutoModelForImageClassification "
                                          r"loads \(`peftray make-tiny-model --kind vit DIR`.*is a 'llama' model "
                                          r"\(LlamaForCausalLM\); use task: causal_lm or seq_cls"):
        tokenizer_and_data(spec, str(tiny_model))
    spec = load_spec("jobs/tiny-lora-instruct.yaml", [f"base_model.path={tiny_vit}"])
    with pytest.raises(ConfigError, match=r"`task: causal_lm` needs a base model that AutoModelForCausalLM loads, but "
                                          r"`base_model.path` .* is a 'vit' model \(ViTForImageClassification\); "
                                          "use task: image_cls"):
        tokenizer_and_data(spec, str(tiny_vit))


def test_image_cls_on_a_pipeline_folder_is_refused(tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    spec = load_spec(SPEC, [f"base_model.path={tmp_path / 'pipe'}"])
    with pytest.raises(ConfigError, match=r"is a diffusers pipeline, but `task: image_cls` needs a transformers model"):
        tokenizer_and_data(spec, str(tmp_path / "pipe"))


def test_hub_ids_and_remote_code_are_left_to_from_pretrained(tmp_path):
    from peftray.train.model import check_head

    spec = load_spec(SPEC, ["base_model.path=google/vit-base-patch16-224"])
    check_head(spec, "google/vit-base-patch16-224")  # no local folder: nothing to read, nothing refused
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "config.json").write_text('{"model_type": "mine", "auto_map": {"AutoModel": "m.M"}}')
    check_head(load_spec(SPEC, [f"base_model.path={tmp_path / 'custom'}"]), str(tmp_path / "custom"))
    (tmp_path / "custom" / "config.json").write_text('{"model_type": "mine"}')
    with pytest.raises(ConfigError, match="is a 'mine' model \\(no architectures listed\\); use another base model"):
        check_head(load_spec(SPEC, [f"base_model.path={tmp_path / 'custom'}"]), str(tmp_path / "custom"))
