"""Each dataset format turns rows into the right ids and loss mask; bad data fails fast and says why."""

from __future__ import annotations

import json

import pytest

from peftray.data import BatchPlan, collate, load_rows, prepare_data
from peftray.errors import ConfigError
from peftray.jobspec import load_spec

JOB = """
name: fmt
base_model: {path: TINY}
adapter: lora
dataset: {source: SRC, format: FORMAT, eval_fraction: 0.0, max_seq_len: 64}
"""


def _spec(tiny, src, fmt, *overrides):
    return load_spec(JOB.replace("TINY", str(tiny)).replace("SRC", str(src)).replace("FORMAT", fmt), list(overrides))


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_instruction_masks_the_prompt(tmp_path, tiny_model, tok):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"q": "Reverse the word: apple =>", "a": " elppa"}])
    data = prepare_data(_spec(tiny_model, src, "instruction", "dataset.prompt_field=q", "dataset.response_field=a"), tok)
    ex = data.train[0]
    prompt = tok("Reverse the word: apple =>")["input_ids"]  # with bos
    response = tok(" elppa", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + response
    assert ex["labels"] == [-100] * len(prompt) + response


def test_chat_learns_only_assistant_turns(tmp_path, tiny_model, tok):
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Day after Monday?"},
            {"role": "assistant", "content": "Tuesday"}, {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "Wednesday"}]
    src = _write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    ex = prepare_data(_spec(tiny_model, src, "chat"), tok).train[0]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex["input_ids"]) == full
    learned = tok.decode([t for t in ex["labels"] if t != -100])
    # exactly the two assistant contents with their end markers; no role header, no user text
    assert learned == "Tuesday<|end|>\nWednesday<|end|>\n"


def test_text_packing_fills_blocks(tmp_path, tiny_model, tok):
    rows = [{"text": f"The river moves the last train number {i}."} for i in range(20)]
    src = _write_jsonl(tmp_path / "t.jsonl", rows)
    plain = prepare_data(_spec(tiny_model, src, "text"), tok).train
    packed = prepare_data(_spec(tiny_model, src, "text", "dataset.packing=true", "dataset.max_seq_len=32"), tok).train
    stream = [t for ex in plain for t in ex["input_ids"]]
    assert [t for ex in packed for t in ex["input_ids"]] == stream  # nothing lost, order kept
    assert all(len(ex["input_ids"]) == 32 for ex in packed[:-1]) and len(packed) == -(-len(stream) // 32)
    assert all(ex["labels"] == ex["input_ids"] for ex in packed)


def test_classification_csv_and_parquet(tmp_path, tiny_model, tok):
    import pandas as pd

    frame = pd.DataFrame({"sentence": ["good", "bad", "great", "awful"], "y": ["pos", "neg", "pos", "neg"]})
    frame.to_csv(tmp_path / "c.csv", index=False)
    frame.to_parquet(tmp_path / "c.parquet")
    for src in (tmp_path / "c.csv", tmp_path / "c.parquet"):
        spec = _spec(tiny_model, src, "classification", "task=seq_cls", "dataset.text_field=sentence",
                     "dataset.label_field=y", "dataset.labels=[neg, pos]")
        data = prepare_data(spec, tok)
        assert data.label_names == ["neg", "pos"] and [e["label"] for e in data.train] == [1, 0, 1, 0]
        assert data.fingerprint.startswith("sha256:")


def test_fingerprint_is_sha256_of_the_file_bytes(tmp_path, tiny_model):
    import hashlib

    src = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    rows = load_rows(_spec(tiny_model, src, "text").dataset)
    assert rows.fingerprint == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path, tiny_model):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(40)])
    spec = _spec(tiny_model, src, "text", "dataset.eval_fraction=0.25")
    a, b = load_rows(spec.dataset, seed=1), load_rows(spec.dataset, seed=1)
    assert a.eval == b.eval and len(a.eval) == 10 and len(a.train) == 30
    assert not {r["text"] for r in a.train} & {r["text"] for r in a.eval}


@pytest.mark.parametrize("override, needles", [
    (["dataset.prompt_field=question"], ["`dataset.prompt_field`", "'question'", "prompt, response"]),
    (["dataset.max_seq_len=4"], ["row 1", "prompt is", "max_seq_len` 4"]),
    (["dataset.source=/nope/missing.jsonl"], ["/nope/missing.jsonl", "does not exist"]),
])
def test_bad_data_fails_fast(tmp_path, tiny_model, tok, override, needles):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Reverse the word: apple =>", "response": " elppa"}])
    with pytest.raises(ConfigError) as info:
        prepare_data(_spec(tiny_model, src, "instruction", *override), tok)
    for needle in needles:
        assert needle in str(info.value)


def test_batch_plan_two_workers_cover_one_worker_batch():
    one = BatchPlan(num_rows=40, batch_size=8, world_size=1, accumulation=1, seed=3)
    two = BatchPlan(num_rows=40, batch_size=4, world_size=2, accumulation=1, seed=3)
    for step in range(12):  # crosses epochs
        assert two.micro_batches(step, 0)[0] + two.micro_batches(step, 1)[0] == one.micro_batches(step, 0)[0]
    with pytest.raises(ConfigError, match="fewer than one optimizer step"):
        BatchPlan(num_rows=5, batch_size=4, world_size=2, accumulation=1, seed=0).check()


def test_collate_pads_with_ignored_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
