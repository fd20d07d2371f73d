"""`fetch`: a registered adapter version as a verified local folder, from the cache when it is there.

The bytes come straight from S3 (where the MLflow server stored them) with s3fs: every file, split into
ranges, downloaded concurrently, hashed while written, and accepted only if its sha256 matches the digest
recorded in the registry at registration. A cached copy is re-hashed before it is returned, and needs no
network at all when the reference is an immutable `name/version` (or an AdapterVersion).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from peftray.endpoints import Config, load_config
from peftray.errors import IntegrityError, PeftrayError
from peftray.registry import types as t
from peftray.registry.cache import AdapterCache
from peftray.registry.client import get_config, s3_path_of, s3fs_for
from peftray.registry.resolve import parse_ref, resolve
from peftray.registry.types import AdapterVersion
from peftray.registry.validate import sha256_file

# Files are fetched concurrently; a file above MIN_PART is also split into up to PARTS_PER_FILE ranged GETs.
# Below ~16 MB a split costs more (requests, CPU) than it gains, even on real S3: measured on the local stack,
# one GET of 10 MB took 54 ms, four parallel ranges 85 ms.
MIN_PART, PARTS_PER_FILE = 16 << 20, 8
BATCH_BYTES = 256 * 1024 * 1024  # most bytes held in memory at once


def fetch(ref_or_version: str | AdapterVersion, config: Config | None = None) -> Path:
    """Download (or find in the cache) one adapter version and return its local folder.

    Args:
        ref_or_version: `name/3`, `name@production`, `name@latest`, or an AdapterVersion.
        config: endpoints and `cache_dir`; default `load_config()`.

    Returns:
        A folder with the adapter's files (adapter_config.json, adapter_model.safetensors, ...). Treat it as
        read-only: its files are shared with other versions that hold the same bytes.

    Raises:
        NotFoundError: the reference does not resolve.
        IntegrityError: a downloaded file does not match its recorded sha256 (nothing of it is kept).
    """
    cfg = config or load_config()
    cache = AdapterCache(cfg.cache_dir)
    av = _version_of(ref_or_version, cfg, cache)
    if not av.files:
        raise IntegrityError(f"{av.ref} has no recorded sha256 digests ({t.TAG_FILES} tag), so its bytes cannot be "
                             "verified. Register the adapter with peftray (peftray registry import).")
    missing = {rel: sha for rel, sha in av.files.items() if rel not in cache.valid_blobs(av.files)}
    if missing:
        _download(av, missing, cfg, cache)
    folder = cache.assemble(av.files)
    cache.touch(folder)
    cache.save_ref(av)
    return folder


def _version_of(ref, cfg: Config, cache: AdapterCache) -> AdapterVersion:
    if isinstance(ref, AdapterVersion):
        return ref
    r = parse_ref(ref)
    if r.version is not None:  # immutable: a version fetched before resolves without the network
        known = cache.load_ref(r.name, r.version)
        if known is not None:
            return known
    return resolve(ref, get_config(cfg))


def _download(av: AdapterVersion, missing: dict[str, str], cfg: Config, cache: AdapterCache) -> None:
    tmp = cache.tmpdir()
    try:
        s3_root = (av.tags.get(t.TAG_S3_URI) or "").removeprefix("s3://") or s3_path_of(av.source, cfg)
        try:
            if s3_root:  # hashed in memory as the bytes arrive: no second read of the files
                digests = _download_s3(cfg, s3_root, list(missing), tmp, _sizes(av))
            else:
                _download_mlflow(cfg, av.source, tmp)
                digests = {rel: _sha(tmp / rel) for rel in missing}
        except PeftrayError:
            raise
        except Exception as exc:  # noqa: BLE001 - network/store errors: say which store, keep the cause
            where = f"s3://{s3_root} (endpoint {cfg.s3_endpoint_url or 'AWS'})" if s3_root else av.source
            raise PeftrayError(f"could not download {av.ref} from {where}: {exc}. Check that the object store is "
                               "reachable and the credentials are right (peftray stack status).") from exc
        for rel, sha in missing.items():
            got = digests.get(rel, "(file missing)")
            if got != sha:
                cache.evict_folder(av.files)
                raise IntegrityError(
                    f"{av.ref}: file {rel!r} failed its integrity check (sha256 {got[:16]}..., registered "
                    f"{sha[:16]}...). The stored bytes were changed or corrupted after registration; the download "
                    "was discarded. Re-register the adapter from a trusted copy.")
            cache.add_blob(tmp / rel, sha)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sizes(av: AdapterVersion) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads(av.tags.get(t.TAG_SIZES) or "{}").items()}
    except (ValueError, AttributeError):
        return {}


def _sha(path: Path) -> str:
    return sha256_file(path) if path.is_file() else "(file missing)"


def _download_s3(cfg: Config, s3_root: str, rels: list[str], dst: Path, sizes: dict[str, int]) -> dict[str, str]:
    """All files in ranged GETs issued concurrently by s3fs, at most BATCH_BYTES in memory at once.

    Returns the sha256 of each file written (parts are requested, and hashed, in file order).
    """
    fs = s3fs_for(cfg)
    if not all(rel in sizes for rel in rels):  # versions registered before sizes were recorded
        sizes = {k[len(s3_root) + 1:]: int(v["size"]) for k, v in fs.find(s3_root, detail=True).items()}
    parts = []  # (rel, start, end)
    for rel in rels:
        size = sizes.get(rel)
        if size is None:
            continue  # reported by the sha check as missing
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(b"")
        step = max(MIN_PART, -(-size // PARTS_PER_FILE))
        parts += [(rel, s, min(s + step, size)) for s in range(0, size, step)]
    hashes = {rel: hashlib.sha256() for rel, _, _ in parts}
    batch: list = []
    for part in parts:
        batch.append(part)
        if sum(e - s for _, s, e in batch) >= BATCH_BYTES:
            _get_batch(fs, s3_root, batch, dst, hashes)
            batch = []
    if batch:
        _get_batch(fs, s3_root, batch, dst, hashes)
    return {rel: h.hexdigest() for rel, h in hashes.items()}


def _get_batch(fs, s3_root: str, batch: list, dst: Path, hashes: dict) -> None:
    datas = fs.cat_ranges([f"{s3_root}/{rel}" for rel, _, _ in batch], [s for _, s, _ in batch],
                          [e for _, _, e in batch])
    for (rel, start, _), data in zip(batch, datas):
        if isinstance(data, Exception):
            raise data
        hashes[rel].update(data)
        with open(dst / rel, "r+b") as fh:
            fh.seek(start)
            fh.write(data)


def _download_mlflow(cfg: Config, source: str, dst: Path) -> None:
    """Fallback for artifact stores peftray cannot read directly: through the MLflow server."""
    import mlflow.artifacts

    cfg = get_config(cfg)
    out = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst / "_dl"),
                                                   tracking_uri=cfg.mlflow_tracking_uri))
    for item in out.iterdir():
        shutil.move(str(item), dst / item.name)
