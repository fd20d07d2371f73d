"""`/v1/files` of the OpenAI API: fine-tuning files, validated, kept under the caller's prefix in the bucket.

An upload is stored twice under `s3://<bucket>/uploads/<owner>/openai/<file id>/`: the bytes as sent (what
`GET .../content` returns) and `rows.jsonl`, the rows converted to the format peftray's trainer reads
(`openai_validate`). The read policy already lets the owner's jobs read that prefix, and no other user's.
Multipart bodies are parsed with the standard library's MIME parser (no python-multipart dependency).
"""

from __future__ import annotations

import re
import time
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from peftray.errors import QuotaError
from peftray.service.auth import Principal
from peftray.service.intake import read_body
from peftray.service.openai_objects import file_object, listing
from peftray.service.openai_store import FileRecord, OpenAIStore, new_file_id
from peftray.service.openai_translate import BodyError
from peftray.service.openai_validate import convert_file
from peftray.service.runtime import state_of

PURPOSE = "fine-tune"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def openai_store(request: Request) -> OpenAIStore:
    """The OpenAI records of this app's job store (created with the first request that needs them)."""
    state = state_of(request.app)
    if getattr(state, "openai", None) is None:
        state.openai = OpenAIStore(state.store.engine)
    return state.openai


def owner_filter(who: Principal) -> str | None:
    """Whose rows a caller sees: their own; the admin everyone's (None)."""
    return None if who.is_admin else who.user


def parse_multipart(body: bytes, content_type: str | None) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename or None, bytes)."""
    if not (content_type or "").lower().startswith("multipart/form-data"):
        raise BodyError("send the file as multipart/form-data with fields `file` and `purpose`", "file")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _prefix(bucket: str, owner: str, file_id: str) -> str:
    return f"{bucket}/uploads/{owner}/openai/{file_id}"


def _store_upload(request: Request, who: Principal, filename: str, data: bytes) -> FileRecord:
    state, store = state_of(request.app), openai_store(request)
    limit = state.settings.max_stored_bytes_per_user
    used = store.stored_bytes(who.user)
    if used + len(data) > limit:
        raise QuotaError(f"stored bytes quota: you keep {used} bytes of files and this one is {len(data)}; the "
                         f"limit is {limit} bytes per user (PEFTRAY_SERVICE_MAX_STORED_BYTES_PER_USER). Delete "
                         "files you no longer need (DELETE /v1/files/{id}).")
    converted = convert_file(data, filename)
    file_id = new_file_id()
    prefix = _prefix(state.settings.config.bucket, who.user, file_id)
    name = _SAFE.sub("_", filename.rsplit("/", 1)[-1]).strip("._") or "upload.jsonl"
    fs = state.settings.config.s3fs()
    fs.pipe_file(f"{prefix}/{name}", data)
    fs.pipe_file(f"{prefix}/rows.jsonl", converted.jsonl())
    record = FileRecord(id=file_id, owner=who.user, filename=filename, purpose=PURPOSE, bytes=len(data),
                        created_at=time.time(), kind=converted.kind, rows=len(converted.rows),
                        uri=f"s3://{prefix}/{name}", train_uri=f"s3://{prefix}/rows.jsonl")
    return store.add_file(record)


def install(app: FastAPI, principal: Callable[..., Principal]) -> None:
    """Add the `/v1/files` routes to `app`."""

    @app.post("/v1/files", tags=["openai"])
    async def create_file(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """Upload a fine-tuning file (multipart: `file`, `purpose=fine-tune`); 400 names its first bad line."""
        limit = state_of(request.app).settings.max_file_bytes
        body = await read_body(request.stream(), request.headers.get("content-length"), limit)
        fields = parse_multipart(body, request.headers.get("content-type"))
        purpose = fields.get("purpose", (None, b""))[1].decode(errors="replace")
        if purpose != PURPOSE:
            raise BodyError(f"`purpose` must be {PURPOSE!r} (the only purpose this service stores), got "
                            f"{purpose!r}", "purpose")
        if "file" not in fields:
            raise BodyError("no `file` field in the form: send the JSONL file as `file`", "file")
        filename, data = fields["file"]
        record = await run_in_threadpool(_store_upload, request, who, filename or "upload.jsonl", data)
        return file_object(record)

    @app.get("/v1/files", tags=["openai"])
    def list_files(request: Request, purpose: str | None = None,
                   who: Principal = Depends(principal)) -> dict[str, Any]:
        """Your files, newest first (the admin: everyone's)."""
        found = openai_store(request).list_files(owner_filter(who), purpose)
        return listing([file_object(f) for f in found])

    @app.get("/v1/files/{file_id}", tags=["openai"])
    def get_file(file_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return file_object(openai_store(request).get_file(file_id, owner_filter(who)))

    @app.get("/v1/files/{file_id}/content", tags=["openai"])
    def file_content(file_id: str, request: Request, who: Principal = Depends(principal)) -> Response:
        """The file's bytes as uploaded."""
        record = openai_store(request).get_file(file_id, owner_filter(who))
        data = state_of(request.app).settings.config.s3fs().cat_file(record.uri.removeprefix("s3://"))
        return Response(data, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", tags=["openai"])
    def delete_file(file_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """Delete the record and the stored bytes (jobs that already read it are not affected)."""
        store = openai_store(request)
        record = store.get_file(file_id, owner_filter(who))
        fs = state_of(request.app).settings.config.s3fs()
        fs.rm(_prefix(state_of(request.app).settings.config.bucket, record.owner, record.id), recursive=True)
        store.delete_file(record.id)
        return {"id": record.id, "object": "file", "deleted": True}
