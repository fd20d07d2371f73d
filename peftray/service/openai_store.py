"""The OpenAI API's records in the job store's database: uploaded files and fine-tuning jobs.

A fine-tuning job (`ftjob-...`) is one OpenAI-shaped request over one or more peftray jobs: the first
submission, then one more per resume after a pause. All of them run the same spec, so each continues the
run (owner, name, spec fingerprint) from its newest stored checkpoint. Owners see only their own rows: a
lookup of someone else's id is the same 404 as an unknown id.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from peftray.errors import NotFoundError
from peftray.service.store import events

meta = sa.MetaData()
files = sa.Table(
    "peftray_openai_files", meta,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("owner", sa.String(100), nullable=False, index=True),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("purpose", sa.String(40), nullable=False),
    sa.Column("bytes", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # chat | preference
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("uri", sa.Text, nullable=False),  # the bytes as uploaded
    sa.Column("train_uri", sa.Text, nullable=False),  # the rows as peftray's chat / preference format reads them
)
ft_jobs = sa.Table(
    "peftray_openai_ft_jobs", meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("owner", sa.String(100), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, default=False),
    sa.Column("job_ids", sa.Text, nullable=False),  # JSON list of peftray job ids, oldest first
    sa.Column("request", sa.Text, nullable=False),  # JSON: what the job object echoes (model, files, hps, ...)
    sa.Column("spec", sa.Text, nullable=False),  # JSON: the JobSpec every submission of this job runs
)


@dataclass
class FileRecord:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    kind: str
    rows: int
    uri: str
    train_uri: str


@dataclass
class FineTuningRecord:
    seq: int
    id: str
    owner: str
    created_at: float
    paused: bool
    job_ids: list[str]
    request: dict[str, Any]
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def current_job(self) -> str:
        return self.job_ids[-1]


def _ft(row: Any) -> FineTuningRecord:
    d = dict(row._mapping)
    return FineTuningRecord(d["seq"], d["id"], d["owner"], d["created_at"], bool(d["paused"]),
                            json.loads(d["job_ids"]), json.loads(d["request"]), json.loads(d["spec"]))


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


def new_job_id() -> str:
    return "ftjob-" + uuid.uuid4().hex[:24]


class OpenAIStore:
    """Files and fine-tuning jobs, on the job store's engine (tables created on first use)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        meta.create_all(engine)

    # ---- files ----------------------------------------------------------------------------------------------
    def add_file(self, record: FileRecord) -> FileRecord:
        with self.engine.begin() as conn:
            conn.execute(files.insert().values(**record.__dict__))
        return record

    def get_file(self, file_id: str, owner: str | None) -> FileRecord:
        """The file (`owner` None: anyone's, for the admin). Raises NotFoundError, also for others' files."""
        return FileRecord(**dict(self._one(files, file_id, owner, "File object")._mapping))

    def list_files(self, owner: str | None, purpose: str | None = None) -> list[FileRecord]:
        q = sa.select(files).order_by(files.c.created_at.desc())
        if owner is not None:
            q = q.where(files.c.owner == owner)
        if purpose is not None:
            q = q.where(files.c.purpose == purpose)
        with self.engine.connect() as conn:
            return [FileRecord(**dict(r._mapping)) for r in conn.execute(q)]

    def delete_file(self, file_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(files.delete().where(files.c.id == file_id))

    def stored_bytes(self, owner: str) -> int:
        q = sa.select(sa.func.coalesce(sa.func.sum(files.c.bytes), 0)).where(files.c.owner == owner)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    # ---- fine-tuning jobs -----------------------------------------------------------------------------------
    def add_job(self, job_id: str, owner: str, first_job: str, request: dict[str, Any],
                spec: dict[str, Any]) -> FineTuningRecord:
        with self.engine.begin() as conn:
            conn.execute(ft_jobs.insert().values(id=job_id, owner=owner, created_at=time.time(), paused=False,
                                                 job_ids=json.dumps([first_job]), request=json.dumps(request),
                                                 spec=json.dumps(spec)))
        return self.get_job(job_id, owner)

    def get_job(self, job_id: str, owner: str | None) -> FineTuningRecord:
        """The job (`owner` None: anyone's). Raises NotFoundError, also for others' jobs."""
        return _ft(self._one(ft_jobs, job_id, owner, "fine-tuning job"))

    def _one(self, table: sa.Table, row_id: str, owner: str | None, what: str) -> Any:
        """The row with this id (and owner, unless None); NotFoundError alike for unknown and others' ids."""
        q = sa.select(table).where(table.c.id == row_id)
        if owner is not None:
            q = q.where(table.c.owner == owner)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        if row is None:
            raise NotFoundError(f"No such {what}: {row_id}")
        return row

    def list_jobs(self, owner: str | None, after: str | None, limit: int) -> tuple[list[FineTuningRecord], bool]:
        """Newest first, those older than the job `after` (a cursor); returns (jobs, has_more)."""
        q = sa.select(ft_jobs).order_by(ft_jobs.c.seq.desc()).limit(limit + 1)
        if owner is not None:
            q = q.where(ft_jobs.c.owner == owner)
        with self.engine.connect() as conn:
            if after:
                cursor = conn.execute(sa.select(ft_jobs.c.seq).where(ft_jobs.c.id == after)).scalar()
                if cursor is None:
                    raise NotFoundError(f"`after`: no fine-tuning job {after!r}")
                q = q.where(ft_jobs.c.seq < cursor)
            rows = [_ft(r) for r in conn.execute(q)]
        return rows[:limit], len(rows) > limit

    def set_paused(self, job_id: str, paused: bool, append_job: str | None = None) -> None:
        """Mark the job paused or not; a resume appends the peftray job that continues it."""
        values: dict[str, Any] = {"paused": paused}
        if append_job is not None:
            record = self.get_job(job_id, None)
            values["job_ids"] = json.dumps([*record.job_ids, append_job])
        with self.engine.begin() as conn:
            conn.execute(ft_jobs.update().where(ft_jobs.c.id == job_id).values(**values))

    def events_of(self, job_ids: list[str], before: int | None, limit: int) -> list[dict[str, Any]]:
        """The peftray events of these jobs, newest first, with seq < `before`: {seq, at, kind, state, reason, data}."""
        q = sa.select(events).where(events.c.job_id.in_(job_ids)).order_by(events.c.seq.desc()).limit(limit)
        if before is not None:
            q = q.where(events.c.seq < before)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        out = []
        for r in rows:
            ev = dict(r._mapping)
            ev["data"] = json.loads(ev["data"]) if ev.get("data") else None
            out.append(ev)
        return out
