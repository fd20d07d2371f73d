"""The local content-addressed adapter cache: files stored once by sha256, folders assembled from them.

Layout under `<cache_dir>/registry/`:
    blobs/<sha[:2]>/<sha>         one read-only file per distinct content
    adapters/<content sha256>/    an adapter folder of hard links to blobs (what fetch returns)
    refs/<name>/<version>.json    the AdapterVersion of an immutable `name/version`, so it resolves offline
Writers build in `tmp/` and rename into place, so readers never see half a file or half a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

from peftray.registry.types import AdapterVersion
from peftray.registry.validate import content_digest, sha256_file


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
