"""`GET /v1/fine_tuning/jobs/{id}/checkpoints` lists only checkpoints stored whole, on the real S3 and registry.

A run uploads a checkpoint file by file (Ray Train's upload in no set order) and prunes older ones while it
trains, so a listing that runs beside it sees folders missing files; those are left out, not a server error.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftray
from peftray.errors import NotFoundError
from peftray.jobspec import load_spec
from peftray.registry.finetuned import resolve_fine_tuned
from peftray.service.openai_checkpoints import list_checkpoints
from peftray.service.openai_store import FileRecord, FineTuningRecord
from peftray.service.openai_translate import build_spec, parse_create
from peftray.train import checkpoint
from peftray.train.run import run_folder

pytestmark = pytest.mark.stack


def _job(tiny_model, job_id: str) -> FineTuningRecord:
    body = parse_create({"model": "tiny-llama", "training_file": "file-1", "suffix": "whole"})
    upload = FileRecord("file-1", "carol", "d.jsonl", "fine-tune", 100, 0.0, "chat", 10, "s3://b/file-1/d.jsonl",
                        "s3://b/uploads/carol/openai/file-1/rows.jsonl")
    spec, echo = build_spec(body, job_id, "carol", {"tiny-llama": str(tiny_model)}, {"method": "lora", "r": 4},
                            upload, None)
    return FineTuningRecord(1, job_id, "carol", 0.0, False, [], echo, load_spec(spec).model_dump(mode="json"))


def _store(fs, folder: str, adapter_dir, step: int, files: tuple[str, ...]) -> None:
    local = {"meta.json": json.dumps({"step": step, "metrics": {"train_loss": 1.0 / step}}).encode(),
             checkpoint.STATE_FILE: b"state",  # never read by the listing
             **{f"{checkpoint.ADAPTER_DIR}/{p.name}": p.read_bytes() for p in adapter_dir.iterdir()}}
    for name in files:
        fs.pipe_file(f"{folder}/{name}", local[name])


def test_only_checkpoints_stored_whole_are_listed_and_registered(stack, tiny_model, tmp_path):
    job_id = "ftjob-" + "c" * 24
    ft = _job(tiny_model, job_id)
    torch.manual_seed(0)
    model = peftray.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                   peftray.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    fs = stack.s3fs()
    prefix, name = run_folder(load_spec(ft.spec), ft.owner)
    root = f"{stack.bucket}/{prefix}/{name}"
    assert list_checkpoints(stack, ft) == []  # no run folder yet
    _store(fs, f"{root}/checkpoint_000002", tmp_path / "adapter", 2, checkpoint.FILES)
    # step 4 is still uploading: everything but the trainer state (the in-process upload's last file)
    _store(fs, f"{root}/checkpoint_000004", tmp_path / "adapter", 4, checkpoint.FILES[1:])
    # step 6 has only its meta.json so far (Ray's upload order is not fixed)
    _store(fs, f"{root}/checkpoint_000006", tmp_path / "adapter", 6, ("meta.json",))

    listed = list_checkpoints(stack, ft)
    assert [c["step_number"] for c in listed] == [2]
    assert listed[0]["metrics"]["train_loss"] == pytest.approx(0.5)
    assert resolve_fine_tuned(listed[0]["fine_tuned_model_checkpoint"], stack).version
    for incomplete in (4, 6):  # nothing registered for a half-stored checkpoint
        with pytest.raises(NotFoundError):
            resolve_fine_tuned(f"{ft.request['fine_tuned_model']}:ckpt-step-{incomplete}", stack)

    fs.pipe_file(f"{root}/checkpoint_000004/{checkpoint.STATE_FILE}", b"state")  # its upload ends
    assert [c["step_number"] for c in list_checkpoints(stack, ft)] == [4, 2]
