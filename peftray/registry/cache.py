"""The local content-addressed adapter cache: files stored once by sha256, folders assembled from them.

Layout under `<cache_dir>/registry/`:
    blobs/<sha[:2]>/<sha>         one read-only file per distinct content
    adapters/<content sha256>/    an adapter folder of hard links to blobs (what fetch returns)
    refs/<name>/<version>.json    the AdapterVersion of an immutable `name/version`, so it resolves offline
Writers build in `tmp/` and rename into place, so readers never see half a file or half a folder.
An adapter folder's mtime is its last use (fetch touches it); `prune` drops the least recently used folders,
then the blobs no folder links to any more, until the cache fits a size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

from peftray.registry.types import AdapterVersion
from peftray.registry.validate import content_digest, sha256_file


@dataclass
class PruneResult:
    removed: list[str]  # content digests of the adapter folders removed
    bytes_before: int
    bytes_after: int
    kept_recent: int  # folders over the limit but used within the grace period, kept


class AdapterCache:
    def __init__(self, cache_dir: Path):
        self.root = Path(cache_dir) / "registry"

    def blob(self, sha: str) -> Path:
        return self.root / "blobs" / sha[:2] / sha

    def folder(self, files: dict[str, str]) -> Path:
        return self.root / "adapters" / content_digest(files)

    def tmpdir(self) -> Path:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="dl-", dir=self.root / "tmp"))

    def valid_blobs(self, files: dict[str, str]) -> set[str]:
        """Relative paths whose blob is present with the right sha256; a blob with wrong bytes is evicted."""
        good = set()
        for rel, sha in files.items():
            path = self.blob(sha)
            if not path.is_file():
                continue
            if sha256_file(path) == sha:
                good.add(rel)
            else:
                self.evict_blob(sha)
        return good

    def add_blob(self, src: Path, sha: str) -> None:
        dst = self.blob(sha)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(src, 0o444)  # blobs are shared through hard links: nobody should edit them in place
        os.replace(src, dst)

    def evict_blob(self, sha: str) -> None:
        self.blob(sha).unlink(missing_ok=True)

    def assemble(self, files: dict[str, str]) -> Path:
        """The adapter folder for `files` (all blobs present and verified), built atomically if missing."""
        final = self.folder(files)
        if final.is_dir() and self._links_intact(final, files):
            return final
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        tmp = self.tmpdir()
        for rel, sha in files.items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.blob(sha), dst)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(self.blob(sha), dst)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process assembled it first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _links_intact(self, folder: Path, files: dict[str, str]) -> bool:
        present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        if present != set(files):
            return False
        return all(os.path.samefile(folder / rel, self.blob(sha)) for rel, sha in files.items())

    def touch(self, folder: Path) -> None:
        """Mark an adapter folder as used now (pruning removes the least recently used first)."""
        try:
            os.utime(folder, None)
        except OSError:
            pass

    def size_bytes(self) -> int:
        """Bytes held: every blob once (the folders are hard links to them)."""
        blobs = self.root / "blobs"
        return sum(p.stat().st_size for p in blobs.rglob("*") if p.is_file()) if blobs.is_dir() else 0

    def prune(self, max_bytes: int, grace_s: float = 600.0) -> PruneResult:
        """Shrink the cache to `max_bytes`: least recently used adapter folders first, then orphaned blobs.

        Folders used within `grace_s` are kept even over the limit (a replica may be about to load one), and
        leftover download folders older than a day are removed. Immutable refs (small JSON) are kept.
        """
        before = self.size_bytes()
        now = time.time()
        for tmp in (self.root / "tmp").glob("dl-*") if (self.root / "tmp").is_dir() else ():
            if now - tmp.stat().st_mtime > 86400:
                shutil.rmtree(tmp, ignore_errors=True)
        adapters = self.root / "adapters"
        folders = sorted((p for p in adapters.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) \
            if adapters.is_dir() else []
        removed, size, kept = [], before, 0
        for folder in folders:
            if size <= max_bytes:
                break
            if now - folder.stat().st_mtime < grace_s:
                kept = len(folders) - len(removed)
                break
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
            size = self._drop_orphan_blobs()
        if size > max_bytes and not removed and not kept:
            size = self._drop_orphan_blobs()
        return PruneResult(removed=removed, bytes_before=before, bytes_after=size, kept_recent=kept)

    def _drop_orphan_blobs(self) -> int:
        """Delete blobs that no adapter folder links to; returns the bytes left."""
        left = 0
        blobs = self.root / "blobs"
        for blob in blobs.rglob("*") if blobs.is_dir() else ():
            if not blob.is_file():
                continue
            st = blob.stat()
            if st.st_nlink <= 1:
                blob.unlink(missing_ok=True)
            else:
                left += st.st_size
        return left

    def evict_folder(self, files: dict[str, str]) -> None:
        shutil.rmtree(self.folder(files), ignore_errors=True)

    # ------------------------------------------------------------ immutable refs, for offline resolution

    def _ref_path(self, name: str, version: int) -> Path:
        return self.root / "refs" / name / f"{version}.json"

    def save_ref(self, av: AdapterVersion) -> None:
        path = self._ref_path(av.name, av.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(av.to_dict()))
        os.replace(tmp, path)

    def load_ref(self, name: str, version: int) -> AdapterVersion | None:
        try:
            raw = json.loads(self._ref_path(name, version).read_text())
        except (OSError, ValueError):
            return None
        known = {f.name for f in fields(AdapterVersion)}
        return AdapterVersion(**{k: v for k, v in raw.items() if k in known})
