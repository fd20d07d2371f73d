"""The OpenAI fine-tuning API's pure parts, without the stack: file validation and conversion, body to job
spec translation, fine-tuned model names, multipart parsing and the object shapes."""

from __future__ import annotations

import json

import pytest

from peftray.errors import ConfigError, NotFoundError
from peftray.jobspec import load_spec
from peftray.registry.finetuned import FT_TAG, fine_tuned_name, parse_fine_tuned
from peftray.service.openai_files import parse_multipart
from peftray.service.openai_objects import event_object, job_object
from peftray.service.openai_store import FileRecord, FineTuningRecord
from peftray.service.openai_translate import DEFAULT_LEARNING_RATE, BodyError, build_spec, parse_create
from peftray.service.openai_validate import FileLineError, convert_file
from peftray.service.store import JobRecord

CHAT = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]}
PREF = {"input": {"messages": [{"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello, friend"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away"}]}
JOB = "ftjob-" + "a" * 24
BASES = {"tiny-llama": "/models/tiny-llama"}


def _jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _file(kind: str, rows: int = 10, fid: str = "file-1") -> FileRecord:
    return FileRecord(fid, "alice", "d.jsonl", "fine-tune", 100, 0.0, kind, rows, f"s3://b/{fid}/d.jsonl",
                      f"s3://b/uploads/alice/openai/{fid}/rows.jsonl")


def test_chat_file_converts_to_peftray_chat_rows():
    out = convert_file(_jsonl(CHAT, CHAT), "d.jsonl")
    assert out.kind == "chat" and len(out.rows) == 2
    assert out.rows[0]["messages"][2] == {"role": "assistant", "content": "Hello"}


def test_preference_file_converts_to_prompt_chosen_rejected():
    out = convert_file(_jsonl(PREF), "p.jsonl")
    assert out.kind == "preference"
    assert out.rows[0] == {"prompt": [{"role": "user", "content": "Hi"}],
                           "chosen": [{"role": "assistant", "content": "Hello, friend"}],
                           "rejected": [{"role": "assistant", "content": "Go away"}]}


@pytest.mark.parametrize("bad, expect", [
    (b"{not json}\n", "line 3: not valid JSON"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(), "line 3: `messages[0].role` must be"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "line 3: `messages` has no assistant"),
    (json.dumps({"messages": [], "extra": 1}).encode(), "line 3: unexpected key(s) 'extra'"),
    (b"[1, 2]", "line 3: expected a JSON object"),
])
def test_first_bad_line_is_named(bad, expect):
    data = _jsonl(CHAT) + b"\n" + bad + b"\n" + _jsonl({"bad": "later"})
    with pytest.raises(FileLineError, match=expect.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        convert_file(data, "d.jsonl")


def test_mixed_kinds_and_empty_files_are_refused():
    with pytest.raises(FileLineError, match="line 2: unexpected key"):
        convert_file(_jsonl(CHAT, PREF), "d.jsonl")
    with pytest.raises(FileLineError, match="no rows"):
        convert_file(b"\n\n", "d.jsonl")
    with pytest.raises(FileLineError, match="line 1: `preferred_output` must hold assistant"):
        convert_file(_jsonl({**PREF, "preferred_output": [{"role": "user", "content": "x"}]}), "d.jsonl")


def test_supervised_body_becomes_a_valid_chat_spec():
    body = parse_create({"model": "tiny-llama", "training_file": "file-1", "suffix": "polite", "seed": 7,
                         "hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 5}})
    spec, echo = build_spec(body, JOB, "alice", BASES, {"method": "lora", "r": 4}, _file("chat"), None)
    parsed = load_spec(spec)
    assert parsed.dataset.format == "chat" and parsed.training.objective == "sft"
    assert parsed.training.epochs == 2 and parsed.training.learning_rate == pytest.approx(5 * DEFAULT_LEARNING_RATE)
    assert parsed.training.batch_size == 8 and parsed.training.checkpoint_every == 2  # ceil(10 rows / 8)
    assert parsed.training.seed == 7 and parsed.adapter.r == 4 and parsed.base_model.path == "/models/tiny-llama"
    assert parsed.name == JOB and parsed.model_name == JOB and parsed.dataset.eval_fraction == 0
    assert echo["fine_tuned_model"] == f"ft:tiny-llama:alice:polite:{JOB}"
    assert parsed.registry.tags[FT_TAG] == echo["fine_tuned_model"]


def test_dpo_body_becomes_a_preference_spec_and_extra_body_merges():
    body = parse_create({"model": "tiny-llama", "training_file": "file-1", "validation_file": "file-2",
                         "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "batch_size": 2}}},
                         "peftray": {"training": {"max_steps": 3}, "dataset": {"max_seq_len": 64}}})
    spec, echo = build_spec(body, JOB, "alice", BASES, {"method": "lora"}, _file("preference"),
                            _file("preference", fid="file-2"))
    parsed = load_spec(spec)
    assert parsed.training.objective == "dpo" and parsed.training.beta == 0.3 and parsed.training.batch_size == 2
    assert parsed.training.max_steps == 3 and parsed.training.epochs is None  # n_epochs auto gives way
    assert parsed.dataset.format == "preference" and parsed.dataset.max_seq_len == 64
    assert parsed.dataset.eval_source.endswith("file-2/rows.jsonl")
    assert echo["method"]["type"] == "dpo" and echo["hyperparameters"]["beta"] == 0.3


@pytest.mark.parametrize("data, param", [
    ({"model": "tiny-llama", "training_file": "f", "suffix": "x" * 65}, "suffix"),
    ({"model": "tiny-llama", "training_file": "f", "hyperparameters": {"n_epochs": "many"}},
     "hyperparameters.n_epochs"),
    ({"model": "tiny-llama", "training_file": "f", "method": {"type": "rlhf"}}, "method.type"),
    ({"model": "tiny-llama", "training_file": "f", "colour": "red"}, "colour"),
    ({"training_file": "f"}, "model"),
])
def test_bad_bodies_name_the_field(data, param):
    with pytest.raises(BodyError) as err:
        parse_create(data)
    assert err.value.param == param and f"`{param}`" in str(err.value)


@pytest.mark.parametrize("data, kind, param, expect", [
    ({"model": "gpt-4o"}, "chat", "model", "knows: tiny-llama"),
    ({"method": {"type": "dpo"}}, "chat", "training_file", "needs preference rows"),
    ({"peftray": {"name": "x"}}, "chat", "peftray.name", "may not be set"),
    ({"peftray": {"dataset": {"source": "/etc/passwd"}}}, "chat", "peftray.dataset", "may set only"),
    ({"hyperparameters": {"beta": 0.1}}, "chat", "method.supervised.hyperparameters.beta", "applies to method dpo"),
])
def test_translation_errors_name_the_field(data, kind, param, expect):
    body = parse_create({"model": "tiny-llama", "training_file": "file-1", **data})
    with pytest.raises(BodyError, match=expect) as err:
        build_spec(body, JOB, "alice", BASES, {"method": "lora"}, _file(kind), None)
    assert err.value.param == param


def test_execution_keys_in_extra_body_are_refused():
    body = parse_create({"model": "tiny-llama", "training_file": "file-1",
                         "peftray": {"training": {"runtime_env": {"pip": ["x"]}}}})
    with pytest.raises(ConfigError, match="runtime_env"):
        build_spec(body, JOB, "alice", BASES, {"method": "lora"}, _file("chat"), None)


def test_fine_tuned_names_parse_and_refuse_malformed():
    name = fine_tuned_name("tiny-llama", "alice", None, JOB)
    assert name == f"ft:tiny-llama:alice::{JOB}"
    assert parse_fine_tuned(name).adapter == JOB
    ckpt = parse_fine_tuned(name + ":ckpt-step-12")
    assert ckpt.adapter == f"{JOB}-step-12" and ckpt.step == 12
    for bad in ("ft:tiny-llama:alice:x:job-1", "ft:a:b", f"ft:a:b:c:{JOB}:step-3", "tiny/1"):
        with pytest.raises(NotFoundError, match="ft:<base>:<owner>:<suffix>:ftjob-<id>"):
            parse_fine_tuned(bad)
    with pytest.raises(ConfigError, match="suffix"):
        fine_tuned_name("tiny-llama", "alice", "has:colon", JOB)


def test_multipart_bodies_parse_with_the_standard_library():
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + _jsonl(CHAT) + f"\r\n--{boundary}--\r\n".encode()
    fields = parse_multipart(body, f"multipart/form-data; boundary={boundary}")
    assert fields["purpose"] == (None, b"fine-tune")
    assert fields["file"] == ("d.jsonl", _jsonl(CHAT))
    with pytest.raises(BodyError, match="multipart/form-data"):
        parse_multipart(b"{}", "application/json")


def _records(state: str, paused: bool = False, **job):
    ft = FineTuningRecord(1, JOB, "alice", 100.0, paused, ["job-1"],
                          {"model": "tiny-llama", "training_file": "file-1", "validation_file": None, "suffix": None,
                           "seed": 42, "metadata": {"k": "v"}, "hyperparameters": {"n_epochs": 1},
                           "method": {"type": "supervised"}, "fine_tuned_model": f"ft:tiny-llama:alice::{JOB}"})
    return ft, JobRecord(1, "job-1", JOB, "alice", state, {}, 100.0, 110.0, **job)


def test_job_object_follows_the_newest_peftray_job():
    ft, job = _records("succeeded", finished_at=120.0, metrics={"train_tokens_per_s": 100.0, "train_seconds": 2.0})
    obj = job_object(ft, job)
    assert obj["status"] == "succeeded" and obj["fine_tuned_model"] == f"ft:tiny-llama:alice::{JOB}"
    assert obj["trained_tokens"] == 200 and obj["finished_at"] == 120 and obj["error"] is None
    assert job_object(*_records("cancelled", paused=True))["status"] == "paused"
    assert job_object(*_records("starting"))["status"] == "running"
    failed = job_object(*_records("failed", error="boom"))
    assert failed["status"] == "failed" and failed["error"]["message"] == "boom" and failed["fine_tuned_model"] is None
    running = job_object(*_records("running", running_at=100.0, progress={"step": 2, "total_steps": 4}))
    assert running["estimated_finish"] == 120  # 2 steps took 10 s: 2 more take 10 s


def test_progress_events_are_metrics_events():
    ev = event_object(JOB, {"seq": 7, "at": 5.0, "kind": "progress",
                            "data": {"job": JOB, "step": 3, "total_steps": 4, "loss": 1.5, "eval_loss": 1.7}})
    assert ev["id"] == "ftevent-7" and ev["type"] == "metrics"
    assert ev["data"] == {"step": 3, "total_steps": 4, "train_loss": 1.5, "valid_loss": 1.7}
    state = event_object(JOB, {"seq": 8, "at": 6.0, "kind": "state", "state": "failed", "reason": "training failed"})
    assert state["type"] == "message" and state["level"] == "error" and "failed" in state["message"]
