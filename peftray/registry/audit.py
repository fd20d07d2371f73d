"""The promotion log of one alias: an append-only sequence of JSON objects in S3, ordered by a CAS.

Each entry is `peftray-registry/audit/<name>/<alias>/<seq:010d>.json`, written with `If-None-Match: *`:
exactly one writer wins each sequence number, so two processes promoting at once both land in the log,
in one order everybody agrees on. The alias's holder is a function of the log (replayed by `holders`), and
MLflow's alias is made to follow it (see promote.py), never the other way round.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from peftray.endpoints import Config
from peftray.registry.client import AUDIT_PREFIX, boto3_s3

# Actions that change the holder; others ("refused") are only recorded.
PROMOTE, ROLLBACK, REFUSED = "promote", "rollback", "refused"


class AuditLog:
    """The log of `name@alias` (or, with alias=None, every alias of `name`, read-only)."""

    def __init__(self, cfg: Config, name: str, alias: str | None):
        self.bucket = cfg.bucket
        self.prefix = f"{AUDIT_PREFIX}/{name}/" + (f"{alias}/" if alias else "")
        self.s3 = boto3_s3(cfg)
        self._seen: dict[str, dict[str, Any]] = {}  # key -> entry; entries never change once written

    def keys(self) -> list[str]:
        keys, token = [], None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": self.prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self.s3.list_objects_v2(**kw)
            keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".json")]
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = page["NextContinuationToken"]

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first (read once each: entries are immutable)."""
        keys = self.keys()
        new = [k for k in keys if k not in self._seen]
        with ThreadPoolExecutor(8) as pool:
            for key, body in zip(new, pool.map(self._get, new)):
                self._seen[key] = body
        return sorted((self._seen[k] for k in keys), key=lambda e: (e.get("alias", ""), e["seq"]))

    def _get(self, key: str) -> dict[str, Any]:
        return json.loads(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def last_seq(self) -> int:
        keys = self.keys()
        return int(keys[-1].rsplit("/", 1)[-1].removesuffix(".json")) if keys else 0

    def append(self, entry: dict[str, Any]) -> bool:
        """Write entry as sequence number entry['seq']; False when another writer took that number first."""
        from botocore.exceptions import ClientError

        key = f"{self.prefix}{entry['seq']:010d}.json"
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(entry, sort_keys=True).encode(),
                               ContentType="application/json", IfNoneMatch="*")
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412) or exc.response.get("Error", {}).get("Code") in (
                    "PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        self._seen[key] = entry
        return True


def holders(entries: list[dict[str, Any]]) -> list[int]:
    """Replay the log into the stack of holders (last = current holder; rollback pops back one).

    The first entry's `from_version` is the holder peftray found when the log began (an alias set by hand).
    """
    first = entries[0].get("from_version") if entries else None
    stack = [first] if first is not None else []
    for e in entries:
        if e["action"] == PROMOTE and (not stack or stack[-1] != e["version"]):
            stack.append(e["version"])
        elif e["action"] == ROLLBACK and len(stack) > 1:
            stack.pop()
    return stack
