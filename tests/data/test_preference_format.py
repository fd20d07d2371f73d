"""`dataset.format: preference`: tokenization, masking, TRL's truncation, skipped pairs, bad rows and specs."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from peftray.data import prepare_data
from peftray.data.preference import truncate
from peftray.errors import ConfigError
from peftray.jobspec import JobSpec, load_spec
from peftray.train.model import load_tokenizer
from peftray.train.preference import collate_pairs


def _spec(tiny_model, source, **dataset):
    return JobSpec.model_validate({
        "name": "t", "base_model": str(tiny_model), "training": {"objective": "dpo"},
        "dataset": {"source": str(source), "format": "preference", "eval_fraction": 0, **dataset}})


def _write(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_string_rows_tokenize_like_trl_and_mask_the_prompt(tiny_model, tmp_path):
    spec = _spec(tiny_model, _write(tmp_path, [{"prompt": "Tell me about the team.\n", "chosen": " Thank you.",
                                                 "rejected": " Go away."}]))
    tok = load_tokenizer(spec, str(tiny_model))
    (ex,) = prepare_data(spec, tok).train
    # TRL (non-conversational): the prompt with special tokens, each completion without, eos appended
    assert ex["prompt_ids"] == tok("Tell me about the team.\n")["input_ids"]
    assert ex["chosen_ids"] == tok(" Thank you.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["rejected_ids"] == tok(" Go away.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = collate_pairs([ex], tok.pad_token_id)
    p = len(ex["prompt_ids"])
    assert batch["completion_mask"][0, :p].sum() == 0 and batch["completion_mask"][0, p:].all()
    assert batch["input_ids"].shape[0] == 2  # [chosen; rejected]


def test_chat_rows_use_the_chat_template(tiny_model, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "Hi there"}],
             "chosen": [{"role": "assistant", "content": "Hello, friend."}], "rejected": "Leave me alone."}]
    spec = _spec(tiny_model, _write(tmp_path, rows))
    tok = load_tokenizer(spec, str(tiny_model))
    if not tok.chat_template:
        pytest.skip("the tiny tokenizer has no chat template")  # pragma: no cover - it has one
    (ex,) = prepare_data(spec, tok).train
    head = tok.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"], tokenize=False)
    assert ex["prompt_ids"] == tok(head, add_special_tokens=False)["input_ids"]
    assert ex["chosen_ids"] == tok(full[len(head):], add_special_tokens=False)["input_ids"]
    assert tok.decode(ex["rejected_ids"]).count("Leave me alone.") == 1


def test_truncation_cuts_the_prompt_from_the_left_then_the_completions():
    prompt, chosen, rejected = list(range(10)), [100, 101, 102, 103], [200, 201]
    assert truncate(prompt, chosen, rejected, 20, 5) == (prompt, chosen, rejected)  # fits: nothing cut
    assert truncate(prompt, chosen, rejected, 8, 5) == ([5, 6, 7, 8, 9], [100, 101, 102], [200, 201])
    assert truncate(prompt, chosen, rejected, 8, None) == (prompt, [], [])


def test_identical_and_truncated_pairs_are_counted_not_trained(tiny_model, tmp_path):
    rows = [{"prompt": "a b c", "chosen": " yes", "rejected": " no"},
            {"prompt": "a b c", "chosen": " same", "rejected": " same"},
            {"prompt": "word " * 40, "chosen": " yes", "rejected": " no"}]
    spec = _spec(tiny_model, _write(tmp_path, rows), max_seq_len=16)
    data = prepare_data(spec, load_tokenizer(spec, str(tiny_model)))
    assert [e["row"] for e in data.train] == [1]
    assert data.skipped.identical == [2] and data.skipped.truncated == [3]
    assert data.skipped.counts() == {"data/skipped_identical": 1.0, "data/skipped_truncated": 1.0}
    assert "rows 2" in data.skipped.describe("x") and "rows 3" in data.skipped.describe("x")


@pytest.mark.parametrize("row, needle", [
    ({"prompt": "p", "chosen": " c"}, "row 2: no `rejected` value"),
    ({"prompt": "p", "chosen": " ", "rejected": " r"}, "row 2: `chosen` is empty"),
    ({"prompt": "p", "chosen": " c", "rejected": []}, "row 2: `rejected` is empty"),
])
def test_bad_rows_are_refused_naming_the_row(tiny_model, tmp_path, row, needle):
    spec = _spec(tiny_model, _write(tmp_path, [{"prompt": "p", "chosen": " c", "rejected": " r"}, row]))
    with pytest.raises(ConfigError, match=needle):
        prepare_data(spec, load_tokenizer(spec, str(tiny_model)))


def test_a_missing_column_names_the_field(tiny_model, tmp_path):
    spec = _spec(tiny_model, _write(tmp_path, [{"prompt": "p", "good": " c", "rejected": " r"}]))
    with pytest.raises(ConfigError, match="dataset.chosen_field"):
        prepare_data(spec, load_tokenizer(spec, str(tiny_model)))


@pytest.mark.parametrize("override, needle", [
    ("dataset.format=instruction", "objective: dpo` needs dataset.format 'preference'"),
    ("training.objective=sft", "`training.beta` applies to objective dpo or orpo, got objective 'sft'"),
    ("training.beta=0", "`training.beta` must be > 0, got 0"),
    ("training.beta=-1", "`training.beta` must be > 0"),
    ("training.loss_type=kto", "training.loss_type"),
    ("training.reference=copy", "training.reference"),
    ("training.objective=nope", "training.objective"),
    ("dataset.max_prompt_len=96", "max_prompt_len` \\(96\\) must be below"),
])
def test_bad_preference_specs_are_refused_naming_the_field(override, needle):
    with pytest.raises((ConfigError, ValidationError), match=needle):
        load_spec("jobs/tiny-dpo.yaml", [override])


def test_sft_refuses_the_preference_format():
    with pytest.raises((ConfigError, ValidationError), match="objective: sft` needs dataset.format 'text, instr"):
        load_spec("jobs/tiny-orpo.yaml", ["training.objective=sft", "training.beta=null"])


def test_orpo_refuses_dpo_only_fields():
    with pytest.raises((ConfigError, ValidationError), match="apply to objective dpo"):
        load_spec("jobs/tiny-orpo.yaml", ["training.reference=precomputed"])
