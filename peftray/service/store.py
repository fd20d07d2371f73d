"""The job store: every job, its state transitions and events, and the API tokens, in one SQL database.

SQLAlchemy Core over SQLite (the default, a file in the state folder) or PostgreSQL (production). Every state
change is a compare-and-set (`UPDATE ... WHERE state IN (...)`), so two schedulers, a cancel request and a
reconcile pass can race without a job ever moving backwards or being started twice.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as SAIntegrityError

from peftray.errors import ConflictError, NotFoundError

QUEUED, STARTING, RUNNING = "queued", "starting", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
ACTIVE = (STARTING, RUNNING)
ADMIN_USER = "admin"  # the user the admin token (from the settings) acts as
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
STATES = (QUEUED, *ACTIVE, *TERMINAL)

# Every table is prefixed so the job store can share a database with MLflow (which has its own `jobs`).
meta = sa.MetaData()
jobs = sa.Table(
    "peftray_jobs", meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("name", sa.String(100), nullable=False, index=True),
    sa.Column("owner", sa.String(100), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("reason", sa.Text),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.String(200)),
    sa.Column("ray_job_id", sa.String(100)),
    sa.Column("mlflow_run_id", sa.String(100)),
    sa.Column("model_name", sa.String(100)),
    sa.Column("model_version", sa.String(40)),
    sa.Column("metrics", sa.Text),
    sa.Column("progress", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("running_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    # a retried POST with the same key (per owner) finds the job the first one made
    sa.UniqueConstraint("owner", "idempotency_key", name="uq_peftray_jobs_owner_idempotency_key"),
)
events = sa.Table(
    "peftray_job_events", meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(40), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # state | progress | result
    sa.Column("state", sa.String(16)),
    sa.Column("reason", sa.Text),
    sa.Column("data", sa.Text),
)
tokens = sa.Table(
    "peftray_api_tokens", meta,
    sa.Column("token_sha256", sa.String(64), primary_key=True),  # the token itself is never stored
    sa.Column("user", sa.String(100), nullable=False, index=True),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("token_id", sa.String(40), index=True),  # public handle for listing and revoking
    sa.Column("expires_at", sa.Float),  # None: never
    sa.Column("revoked_at", sa.Float),
)
# Columns added after the first release: a database created before gets them on open (ALTER TABLE ADD).
_ADDED_TOKEN_COLUMNS = ("token_id", "expires_at", "revoked_at")
# One row; claiming a queued job first bumps it, which serialises claims across threads, processes and replicas.
claim_lock = sa.Table("peftray_scheduler_lock", meta, sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("n", sa.Integer, nullable=False))

_JSON_FIELDS = ("spec", "metrics", "progress")


@dataclass
class JobRecord:
    """One job as stored; `to_api()` is its JSON form."""

    seq: int
    id: str
    name: str
    owner: str
    state: str
    spec: dict[str, Any]
    created_at: float
    updated_at: float
    reason: str | None = None
    idempotency_key: str | None = None
    ray_job_id: str | None = None
    mlflow_run_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    metrics: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    error: str | None = None
    cancel_requested: bool = False
    started_at: float | None = None
    running_at: float | None = None
    finished_at: float | None = None
    transitions: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_row(cls, row: Any) -> "JobRecord":
        data = dict(row._mapping)
        for key in _JSON_FIELDS:
            data[key] = json.loads(data[key]) if data.get(key) else None
        data["cancel_requested"] = bool(data.get("cancel_requested"))
        return cls(**data)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_api(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("seq", "transitions")}
        for key in ("created_at", "updated_at", "started_at", "running_at", "finished_at"):
            out[key] = iso(out[key])
        out["transitions"] = [{**t, "at": iso(t["at"])} for t in self.transitions]
        return out


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def _engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # WAL: readers never wait for the writer
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


class JobStore:
    """Jobs, their events and API token hashes in the database at `url` (tables created on first use)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = _engine(url)
        meta.create_all(self.engine)
        _add_missing_columns(self.engine)
        with self.engine.begin() as conn:
            if conn.execute(sa.select(claim_lock.c.id)).first() is None:
                try:
                    conn.execute(claim_lock.insert().values(id=1, n=0))
                except SAIntegrityError:  # another process inserted it first
                    pass

    def close(self) -> None:
        self.engine.dispose()

    # ---- jobs -----------------------------------------------------------------------------------------------
    def create_job(self, owner: str, name: str, spec: dict[str, Any],
                   idempotency_key: str | None = None, model_name: str | None = None) -> tuple[JobRecord, bool]:
        """Record a queued job. Returns (job, created); a known idempotency key returns the earlier job.

        Raises:
            ConflictError: the idempotency key was used before with a different spec.
        """
        now = time.time()
        job_id = "job-" + uuid.uuid4().hex[:16]
        spec_text = json.dumps(spec, sort_keys=True)
        try:
            with self.engine.begin() as conn:
                conn.execute(jobs.insert().values(
                    id=job_id, name=name, owner=owner, state=QUEUED, reason="submitted", spec=spec_text,
                    idempotency_key=idempotency_key, model_name=model_name, cancel_requested=False,
                    created_at=now, updated_at=now))
                conn.execute(events.insert().values(job_id=job_id, at=now, kind="state", state=QUEUED,
                                                    reason="submitted"))
        except SAIntegrityError:
            if idempotency_key is None:
                raise
            earlier = self._by_key(owner, idempotency_key)
            if json.dumps(earlier.spec, sort_keys=True) != spec_text:
                raise ConflictError(
                    f"Idempotency-Key {idempotency_key!r} was already used for job {earlier.id} with a different "
                    "spec. Use a new key for a new job.") from None
            return self.get(earlier.id, with_transitions=True), False
        return self.get(job_id, with_transitions=True), True

    def _by_key(self, owner: str, key: str) -> JobRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.owner == owner, jobs.c.idempotency_key == key)).first()
        return JobRecord.from_row(row)

    def get(self, job_id: str, with_transitions: bool = False) -> JobRecord:
        """The job with this id. Raises NotFoundError."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            if row is None:
                raise NotFoundError(f"job {job_id!r} does not exist. List jobs with `peftray jobs list`.")
            job = JobRecord.from_row(row)
            if with_transitions:
                rows = conn.execute(sa.select(events.c.at, events.c.state, events.c.reason)
                                    .where(events.c.job_id == job_id, events.c.kind == "state")
                                    .order_by(events.c.seq)).all()
                job.transitions = [dict(r._mapping) for r in rows]
        return job

    def list_jobs(self, owner: str | None = None, state: str | None = None, name: str | None = None,
                  limit: int = 50, before: int | None = None) -> tuple[list[JobRecord], int | None]:
        """Newest first. Returns (jobs, cursor of the next page or None)."""
        q = sa.select(jobs).order_by(jobs.c.seq.desc()).limit(limit + 1)
        for col, value in ((jobs.c.owner, owner), (jobs.c.state, state), (jobs.c.name, name)):
            if value is not None:
                q = q.where(col == value)
        if before is not None:
            q = q.where(jobs.c.seq < before)
        with self.engine.connect() as conn:
            rows = [JobRecord.from_row(r) for r in conn.execute(q)]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].seq if more and rows else None)

    def jobs_in(self, states: Iterable[str]) -> list[JobRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).where(jobs.c.state.in_(tuple(states))).order_by(jobs.c.seq))
            return [JobRecord.from_row(r) for r in rows]

    def count(self, state: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(jobs)
        if state:
            q = q.where(jobs.c.state == state)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def transition(self, job_id: str, to_state: str, reason: str, from_states: Iterable[str],
                   **fields: Any) -> bool:
        """Move a job to `to_state` if it is in one of `from_states` (compare-and-set); record the event.

        Returns:
            True if this call made the change, False if the job was no longer in `from_states`.
        """
        now = time.time()
        values = {**_encode(fields), "state": to_state, "reason": reason, "updated_at": now}
        stamp = {STARTING: "started_at", RUNNING: "running_at"}.get(to_state)
        if stamp:
            values[stamp] = now
        if to_state in TERMINAL:
            values["finished_at"] = now
        with self.engine.begin() as conn:
            done = conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.state.in_(tuple(from_states)))
                                .values(**values)).rowcount
            if done:
                conn.execute(events.insert().values(job_id=job_id, at=now, kind="state", state=to_state,
                                                    reason=reason))
        return bool(done)

    def update(self, job_id: str, **fields: Any) -> None:
        """Set fields (ray_job_id, progress, ...) without a state change."""
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**_encode(fields), updated_at=time.time()))

    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(events.insert().values(job_id=job_id, at=time.time(), kind=kind, data=json.dumps(data)))

    def events_after(self, job_id: str, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """Events of a job with seq > `after`, oldest first: {seq, at, kind, state, reason, data}."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(events).where(events.c.job_id == job_id, events.c.seq > after)
                                .order_by(events.c.seq).limit(limit)).all()
        out = []
        for r in rows:
            ev = {k: v for k, v in r._mapping.items() if v is not None and k != "job_id"}
            if "data" in ev:
                ev["data"] = json.loads(ev["data"])
            ev["at"] = iso(ev["at"])
            out.append(ev)
        return out

    def claim_next(self, max_running: int, max_per_user: int) -> JobRecord | None:
        """Move the oldest queued job whose owner is under the limits to `starting`; None if none may start."""
        with self.engine.begin() as conn:
            conn.execute(claim_lock.update().where(claim_lock.c.id == 1).values(n=claim_lock.c.n + 1))
            active = conn.execute(sa.select(jobs.c.owner, sa.func.count()).where(jobs.c.state.in_(ACTIVE))
                                  .group_by(jobs.c.owner)).all()
            per_user = {owner: n for owner, n in active}
            if sum(per_user.values()) >= max_running:
                return None
            full = [o for o, n in per_user.items() if n >= max_per_user]
            q = sa.select(jobs.c.id).where(jobs.c.state == QUEUED, jobs.c.cancel_requested.is_(False))
            if full:
                q = q.where(jobs.c.owner.not_in(full))
            row = conn.execute(q.order_by(jobs.c.seq).limit(1)).first()
            if row is None:
                return None
            now = time.time()
            moved = conn.execute(jobs.update().where(jobs.c.id == row.id, jobs.c.state == QUEUED).values(
                state=STARTING, reason="admitted by the scheduler", started_at=now, updated_at=now)).rowcount
            if not moved:  # cancelled between our select and update
                return None
            conn.execute(events.insert().values(job_id=row.id, at=now, kind="state", state=STARTING,
                                                reason="admitted by the scheduler"))
        return self.get(row.id)

    # ---- tokens ---------------------------------------------------------------------------------------------
    def add_token(self, user: str, token_sha256: str, is_admin: bool = False,
                  expires_at: float | None = None) -> dict[str, Any]:
        """Store a token's hash; returns its public record (id, user, is_admin, created_at, expires_at)."""
        token_id = "tok_" + token_sha256[:16]  # a handle derived from the hash: it reveals nothing of the token
        with self.engine.begin() as conn:
            conn.execute(tokens.insert().values(token_sha256=token_sha256, user=user, is_admin=is_admin,
                                                created_at=time.time(), token_id=token_id, expires_at=expires_at))
        return self.list_tokens(token_id=token_id)[0]

    def token_row(self, token_sha256: str) -> Any | None:
        """The stored row of a token hash (user, is_admin, expires_at, revoked_at), or None."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(tokens).where(tokens.c.token_sha256 == token_sha256)).first()

    def list_tokens(self, user: str | None = None, token_id: str | None = None) -> list[dict[str, Any]]:
        """Public records of tokens (never the hash), oldest first; optionally one user's or one id."""
        q = sa.select(tokens.c.token_id, tokens.c.user, tokens.c.is_admin, tokens.c.created_at,
                      tokens.c.expires_at, tokens.c.revoked_at).order_by(tokens.c.created_at)
        if user is not None:
            q = q.where(tokens.c.user == user)
        if token_id is not None:
            q = q.where(tokens.c.token_id == token_id)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        now = time.time()
        return [{"id": r.token_id, "user": r.user, "is_admin": bool(r.is_admin), "created_at": iso(r.created_at),
                 "expires_at": iso(r.expires_at), "revoked_at": iso(r.revoked_at),
                 "active": r.revoked_at is None and (r.expires_at is None or r.expires_at > now)} for r in rows]

    def user_is_admin(self, user: str) -> bool:
        """True for the admin token's user and for a user holding an active admin token."""
        return user == ADMIN_USER or any(t["is_admin"] and t["active"] for t in self.list_tokens(user=user))

    def revoke_token(self, token_id: str) -> bool:
        """Mark a token revoked (from the next request on); False when it was unknown or already revoked."""
        with self.engine.begin() as conn:
            return bool(conn.execute(tokens.update().where(tokens.c.token_id == token_id,
                                                           tokens.c.revoked_at.is_(None))
                                     .values(revoked_at=time.time())).rowcount)


def _add_missing_columns(engine: sa.Engine) -> None:
    have = {c["name"] for c in sa.inspect(engine).get_columns(tokens.name)}
    for name in _ADDED_TOKEN_COLUMNS:
        if name not in have:
            kind = tokens.c[name].type.compile(engine.dialect)
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text(f"ALTER TABLE {tokens.name} ADD COLUMN {name} {kind}"))
            except sa.exc.DBAPIError:  # another process added it first
                pass
    with engine.begin() as conn:  # tokens issued before ids existed get theirs, so they can be revoked
        conn.execute(tokens.update().where(tokens.c.token_id.is_(None)).values(
            token_id=sa.literal("tok_") + sa.func.substr(tokens.c.token_sha256, 1, 16)))


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if k in _JSON_FIELDS and v is not None else v) for k, v in fields.items()}
