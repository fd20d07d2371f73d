"""The OpenAI fine-tuning API end to end, driven by the unmodified `openai` client only: upload, create on the
tiny model, follow events to `succeeded`, checkpoints, pause + resume, cancel, another user's objects (404),
and a chat on a serving deployment with the job's `fine_tuned_model` answering unlike the base model."""

from __future__ import annotations

import json
import time
import uuid

import openai
import pytest
from svc_helpers import REPO, launch

from peftray.service.client import ServiceClient

pytestmark = [pytest.mark.stack, pytest.mark.slow]
CHAT = REPO / "jobs" / "data" / "tiny_chat.jsonl"
FAST = {"peftray": {"training": {"max_steps": 4}, "dataset": {"max_seq_len": 96}}}


def wait_for(predicate, what: str, timeout: float = 420.0, every: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)  # polling a condition (the job's state), not waiting a fixed time
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def svc(stack, tiny_model, tmp_path_factory):
    proc = launch(stack, tmp_path_factory.mktemp("svc-openai"), base_models=f"tiny-llama={tiny_model}",
                  max_running=1, max_running_per_user=1, max_active_jobs_per_user=2,
                  max_stored_bytes_per_user=int(1.5 * CHAT.stat().st_size))
    admin = ServiceClient(proc.url, proc.admin_token)
    tokens = {u: admin.create_token(u) for u in ("alice", "bob")}
    clients = {u: openai.OpenAI(base_url=proc.url + "/v1", api_key=t, max_retries=0, timeout=60)
               for u, t in tokens.items()}
    yield proc, clients, admin
    admin.close()
    proc.stop()


def _ended(client, job_id: str, states=("succeeded", "failed", "cancelled")):
    job = client.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in states else None


def test_whole_path_with_the_openai_client(svc, stack, ray_session, tiny_model):
    proc, users, admin = svc
    alice, bob = users["alice"], users["bob"]
    upload = alice.files.create(file=("chat.jsonl", CHAT.read_bytes()), purpose="fine-tune")
    assert upload.id.startswith("file-") and upload.bytes == CHAT.stat().st_size
    assert alice.files.content(upload.id).content == CHAT.read_bytes()
    assert [f.id for f in alice.files.list().data] == [upload.id]

    bad = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": 3}\n'
    with pytest.raises(openai.BadRequestError, match="line 2: `messages` must be a non-empty list"):
        alice.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        alice.fine_tuning.jobs.create(model="gpt-4o", training_file=upload.id)
    assert err.value.body["param"] == "model" and "tiny-llama" in err.value.body["message"]

    # 1) trained to the end, with a learning rate high enough that the tiny model's answers change
    done = alice.fine_tuning.jobs.create(model="tiny-llama", training_file=upload.id, suffix="terse", seed=3,
                                         metadata={"run": "main"},
                                         hyperparameters={"learning_rate_multiplier": 50, "batch_size": 4},
                                         extra_body={"peftray": {"training": {"max_steps": 6, "checkpoint_every": 3},
                                                                 "dataset": {"max_seq_len": 96}}})
    # 3) cancelled (the service admits one job at a time: this one is still queued, or just starting)
    cancelled = alice.fine_tuning.jobs.create(model="tiny-llama", training_file=upload.id, extra_body=FAST)
    # quota: two jobs queued or running per user here (the first one needs tens of seconds to train)
    with pytest.raises(openai.RateLimitError, match="running jobs quota: you have 2 jobs queued or running"):
        alice.fine_tuning.jobs.create(model="tiny-llama", training_file=upload.id, extra_body=FAST)
    assert alice.fine_tuning.jobs.cancel(cancelled.id).status in ("cancelled", "queued", "running")
    assert wait_for(lambda: _ended(alice, cancelled.id), "the cancelled job").status == "cancelled"

    for other in (lambda: bob.files.retrieve(upload.id), lambda: bob.fine_tuning.jobs.retrieve(done.id),
                  lambda: bob.fine_tuning.jobs.list_events(done.id), lambda: bob.fine_tuning.jobs.cancel(done.id)):
        with pytest.raises(openai.NotFoundError):
            other()
    assert bob.fine_tuning.jobs.list().data == [] and bob.files.list().data == []

    # quota: bytes kept per user (1.5 files here; alice's file is not bob's), room again after a delete
    kept = bob.files.create(file=("a.jsonl", CHAT.read_bytes()), purpose="fine-tune")
    with pytest.raises(openai.RateLimitError, match="stored bytes quota"):
        bob.files.create(file=("b.jsonl", CHAT.read_bytes()), purpose="fine-tune")
    assert [f.id for f in bob.files.list().data] == [kept.id]
    assert bob.files.delete(kept.id).deleted
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(kept.id)
    assert bob.files.delete(bob.files.create(file=("c.jsonl", CHAT.read_bytes()), purpose="fine-tune").id).deleted

    finished = wait_for(lambda: _ended(alice, done.id), "the first job")
    assert finished.status == "succeeded", finished.error
    assert finished.fine_tuned_model == f"ft:tiny-llama:alice:terse:{done.id}" and finished.trained_tokens > 0
    events = list(alice.fine_tuning.jobs.list_events(done.id, limit=5))  # pages through `after`
    assert any(e.type == "metrics" and "train_loss" in e.data for e in events)
    assert [e.data.get("state") for e in events if e.type == "message" and e.data.get("state")][0] == "succeeded"
    ckpts = alice.fine_tuning.jobs.checkpoints.list(done.id).data
    assert [c.step_number for c in ckpts] == sorted((c.step_number for c in ckpts), reverse=True) and ckpts
    assert ckpts[0].fine_tuned_model_checkpoint == f"{finished.fine_tuned_model}:ckpt-step-{ckpts[0].step_number}"
    listed = alice.fine_tuning.jobs.list(metadata={"run": "main"}).data
    assert [j.id for j in listed] == [done.id]

    # 2) paused after its first checkpoint, then resumed (started after the first: 2 cores train one at a time)
    paused = alice.fine_tuning.jobs.create(model="tiny-llama", training_file=upload.id,
                                           extra_body={"peftray": {"training": {"max_steps": 60, "checkpoint_every": 2},
                                                                   "dataset": {"max_seq_len": 96}}})
    wait_for(lambda: alice.fine_tuning.jobs.checkpoints.list(paused.id).data, "a checkpoint of the second job")
    assert alice.fine_tuning.jobs.pause(paused.id).status == "paused"
    wait_for(lambda: _stopped(admin, alice.fine_tuning.jobs.retrieve(paused.id)), "the paused job to stop")
    assert alice.fine_tuning.jobs.retrieve(paused.id).status == "paused"
    resumed = alice.fine_tuning.jobs.resume(paused.id)
    assert resumed.status in ("queued", "running")
    assert len(resumed.peftray_job_ids) == 2
    wait_for(lambda: _log_with(admin, resumed.peftray_job_ids[-1], "from the checkpoint after step"),
             "the resumed run to load its checkpoint")
    assert alice.fine_tuning.jobs.cancel(paused.id).id == paused.id  # resuming is shown: save the cores

    _chat_differs(stack, tiny_model, finished.fine_tuned_model, ckpts[0].fine_tuned_model_checkpoint)


def _stopped(admin: ServiceClient, job) -> bool:
    return admin.get(job.peftray_job_ids[-1])["state"] == "cancelled"


def _log_with(admin: ServiceClient, job_id: str, text: str) -> str | None:
    log = "".join(admin.logs(job_id))
    return log if text in log else None


def _chat_differs(stack, tiny_model, fine_tuned: str, checkpoint: str) -> None:
    from peftray.serve import ServeConfig, deploy, down

    tag = uuid.uuid4().hex[:6]
    spec = ServeConfig(name=f"ft{tag}", base_model=str(tiny_model), model_id="tiny-llama", max_batch_size=4,
                       max_ongoing_requests=4, request_timeout_s=60, num_cpus=0, torch_threads=1,
                       api_key="test-key-" + tag)
    dep = deploy(spec, wait_s=240)
    try:
        client = openai.OpenAI(base_url=dep.url + "/v1", api_key=dep.api_key, max_retries=0, timeout=60)
        ids = [m.id for m in client.models.list().data]
        assert fine_tuned in ids and checkpoint in ids
        question = [{"role": "user", "content": "Reverse the word: planet =>"}]
        answers = {m: client.chat.completions.create(model=m, messages=question, max_tokens=8, temperature=0)
                   .choices[0].message.content for m in ("tiny-llama", fine_tuned, checkpoint)}
        assert answers[fine_tuned] != answers["tiny-llama"], json.dumps(answers)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=fine_tuned.replace(":terse:", ":other:"), messages=question)
    finally:
        down(spec.name)
