"""The job store on SQLite and PostgreSQL: idempotency, compare-and-set transitions, admission limits, tokens.

Pure database logic: no Ray. Every check runs from many threads at once, because the races are the point.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from peftray.errors import ConflictError, NotFoundError
from peftray.service.auth import issue_token, token_hash
from peftray.service.store import ACTIVE, CANCELLED, QUEUED, RUNNING, STARTING, SUCCEEDED, JobStore

SPEC = {"name": "s", "training": {"max_steps": 3}}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        # a fresh schema per test on the session's PostgreSQL database
        base = request.getfixturevalue("pg_url")
        schema = f"s{abs(hash(tmp_path)) % 10**8}"
        with sa.create_engine(base).begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        url = base + f"?options=-csearch_path%3D{schema}"
    s = JobStore(url)
    yield s
    s.close()


def test_idempotency_key_creates_one_job_under_concurrent_retries(store):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.create_job("alice", "s", SPEC, "key-1"), range(16)))
    ids = {job.id for job, _ in results}
    assert len(ids) == 1
    assert sum(created for _, created in results) == 1
    assert store.count() == 1
    # the same key by another user is another job; the same key with another spec is refused
    assert store.create_job("bob", "s", SPEC, "key-1")[1] is True
    with pytest.raises(ConflictError, match="key-1"):
        store.create_job("alice", "s", {**SPEC, "name": "other"}, "key-1")
    assert store.count() == 2


def test_claims_respect_service_and_user_limits(store):
    made = [store.create_job(owner, "s", SPEC)[0] for owner in ["a", "a", "a", "b", "b", "c"]]
    with ThreadPoolExecutor(6) as pool:
        claimed = [j for j in pool.map(lambda _: store.claim_next(max_running=3, max_per_user=2), range(12)) if j]
    # claims are serialised: the oldest queued jobs whose owners are under the per-user limit win
    assert sorted(j.id for j in claimed) == sorted([made[0].id, made[1].id, made[3].id])
    assert all(j.state == STARTING and j.started_at for j in claimed)
    assert len(store.jobs_in(ACTIVE)) == 3
    assert store.claim_next(3, 2) is None  # the service is full
    assert store.transition(made[0].id, SUCCEEDED, "done", ACTIVE)
    assert store.claim_next(3, 2).id == made[2].id  # a is under its limit again; a's 3rd job is the oldest
    assert store.claim_next(3, 2) is None
    assert store.claim_next(max_running=6, max_per_user=2).id == made[4].id
    assert store.claim_next(max_running=6, max_per_user=2).id == made[5].id
    assert store.claim_next(max_running=0, max_per_user=5) is None


def test_transition_is_compare_and_set(store):
    job, _ = store.create_job("alice", "s", SPEC)
    assert store.claim_next(1, 1).id == job.id
    assert store.transition(job.id, RUNNING, "ray running", [STARTING])
    assert not store.transition(job.id, RUNNING, "again", [STARTING])  # already running: no second event
    with ThreadPoolExecutor(2) as pool:
        won = list(pool.map(lambda st: store.transition(job.id, st, st, ACTIVE), [SUCCEEDED, CANCELLED] * 4))
    assert sum(won) == 1
    final = store.get(job.id, with_transitions=True)
    assert [t["state"] for t in final.transitions] == [QUEUED, STARTING, RUNNING, final.state]
    assert final.finished_at and final.running_at and final.started_at
    assert not store.transition(job.id, QUEUED, "back", ACTIVE)  # ended jobs never move again
    with pytest.raises(NotFoundError):
        store.get("job-nope")


def test_list_is_paginated_newest_first_and_filtered(store):
    made = [store.create_job("alice" if i % 2 else "bob", f"n{i % 3}", SPEC)[0].id for i in range(7)]
    page1, cursor = store.list_jobs(limit=3)
    page2, cursor2 = store.list_jobs(limit=3, before=cursor)
    page3, cursor3 = store.list_jobs(limit=3, before=cursor2)
    assert [j.id for j in page1 + page2 + page3] == made[::-1] and cursor3 is None
    assert {j.owner for j in store.list_jobs(owner="alice")[0]} == {"alice"}
    assert len(store.list_jobs(name="n0")[0]) == 3


def test_tokens_are_stored_as_hashes(store):
    token = issue_token(store, "alice")["token"]
    row = store.token_row(token_hash(token))
    assert (row.user, bool(row.is_admin)) == ("alice", False)
    assert store.token_row(token_hash(token + "x")) is None
    with store.engine.connect() as conn:
        dump = " ".join(str(v) for row in conn.execute(sa.text("SELECT * FROM peftray_api_tokens")) for v in row)
    assert token not in dump and token_hash(token) in dump


def test_a_token_table_of_the_first_release_gains_expiry_and_revocation(tmp_path):
    from peftray.service.auth import authenticate

    url = f"sqlite:///{tmp_path / 'old.db'}"
    with sa.create_engine(url).begin() as conn:  # the table as the first release made it, with one token
        conn.execute(sa.text("CREATE TABLE peftray_api_tokens (token_sha256 VARCHAR(64) PRIMARY KEY, "
                             '"user" VARCHAR(100) NOT NULL, is_admin BOOLEAN NOT NULL, created_at FLOAT NOT NULL)'))
        conn.execute(sa.text("INSERT INTO peftray_api_tokens VALUES (:h, 'old', 0, 1.0)"), {"h": token_hash("ptk_old")})
    store = JobStore(url)
    try:
        assert authenticate("Bearer ptk_old", store, None).user == "old"  # never expires, as before
        (old,) = store.list_tokens(user="old")
        assert old["id"] == "tok_" + token_hash("ptk_old")[:16] and old["active"]  # an id to revoke it by
        new = issue_token(store, "alice", ttl_s=60)
        assert authenticate(f"Bearer {new['token']}", store, None).user == "alice"
        assert store.revoke_token(new["id"]) and not store.revoke_token(new["id"])
        with pytest.raises(Exception, match="revoked"):
            authenticate(f"Bearer {new['token']}", store, None)
    finally:
        store.close()


def test_refuse_changed_spec_compares_the_owners_earlier_spec(tmp_path):
    """Issue 14 item 2's flag: the same name with a changed spec is refused (409); the same spec is not."""
    from peftray.endpoints import load_config
    from peftray.jobspec import load_spec
    from peftray.service.admission import admit
    from peftray.service.auth import Principal
    from peftray.service.settings import ServiceSettings

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    settings = ServiceSettings(config=load_config(tmp_path), db_url=store.url)
    spec = load_spec({"name": "same", "base_model": "org/m", "dataset": {"source": "org/d", "format": "text"}})
    changed = spec.model_copy(update={"training": spec.training.model_copy(update={"learning_rate": 1e-3})})
    alice, bob = Principal("alice", is_admin=True), Principal("bob", is_admin=True)  # admins: no registry call
    try:
        store.create_job("alice", "same", spec.model_dump(mode="json"))
        assert admit(spec, alice, settings, store, refuse_changed_spec=True) == spec
        assert admit(changed, alice, settings, store) == changed  # without the flag: a new run of the name
        assert admit(changed, bob, settings, store, refuse_changed_spec=True) == changed  # bob's names are his
        with pytest.raises(ConflictError, match="different spec"):
            admit(changed, alice, settings, store, refuse_changed_spec=True)
    finally:
        store.close()
