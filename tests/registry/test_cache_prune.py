"""The adapter cache shrinks least-recently-used first, keeps shared and recently used bytes, needs no server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

from peftray.registry.cache import AdapterCache

MB = 1_000_000


def _blob(cache: AdapterCache, tmp, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    if not cache.blob(sha).exists():
        src = tmp / f"src-{sha[:8]}"
        src.write_bytes(data)
        cache.add_blob(src, sha)
    return sha


def _adapter(cache: AdapterCache, tmp, seed: int, shared: bytes, age_s: float):
    files = {"adapter_model.safetensors": _blob(cache, tmp, bytes([seed]) * MB),
             "adapter_config.json": _blob(cache, tmp, shared)}
    folder = cache.assemble(files)
    old = time.time() - age_s
    os.utime(folder, (old, old))
    return files, folder


def test_prune_removes_least_recently_used_and_keeps_shared_and_recent(tmp_path):
    cache = AdapterCache(tmp_path / "cache")
    shared = b'{"peft_type": "LORA"}' * 1000
    a, fa = _adapter(cache, tmp_path, 1, shared, age_s=3000)
    b, fb = _adapter(cache, tmp_path, 2, shared, age_s=2000)
    c, fc = _adapter(cache, tmp_path, 3, shared, age_s=1000)
    d, fd = _adapter(cache, tmp_path, 4, shared, age_s=5)  # just used
    assert cache.size_bytes() == 4 * MB + len(shared)

    res = cache.prune(max_bytes=2 * MB + len(shared), grace_s=600)
    assert res.removed == [fa.name, fb.name]  # oldest first, and no more than needed
    assert not fa.exists() and not fb.exists() and fc.is_dir() and fd.is_dir()
    assert not cache.blob(a["adapter_model.safetensors"]).exists()
    assert cache.blob(a["adapter_config.json"]).exists()  # still linked from c and d
    assert cache.size_bytes() == res.bytes_after == 2 * MB + len(shared)
    assert (fc / "adapter_model.safetensors").read_bytes() == bytes([3]) * MB

    res = cache.prune(max_bytes=0, grace_s=600)
    assert res.removed == [fc.name] and res.kept_recent == 1 and fd.is_dir()  # d was used within the grace period

    res = cache.prune(max_bytes=0, grace_s=0)
    assert res.removed == [fd.name] and cache.size_bytes() == 0


def test_fetch_marks_use_so_a_reused_adapter_survives(tmp_path):
    cache = AdapterCache(tmp_path / "cache")
    shared = b"{}"
    old, f_old = _adapter(cache, tmp_path, 1, shared, age_s=3000)
    new, f_new = _adapter(cache, tmp_path, 2, shared, age_s=2000)
    cache.touch(f_old)  # what fetch does on a cache hit
    res = cache.prune(max_bytes=MB + len(shared), grace_s=0)
    assert res.removed == [f_new.name] and f_old.is_dir()


def test_cli_refuses_a_negative_size(tmp_path):
    env = {**os.environ, "PEFTRAY_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "peftray", "--state-dir", str(tmp_path / "s"), "registry",
                           "prune-cache", "--max-gb", "-1"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "--max-gb must be >= 0" in done.stderr


def test_cli_prunes_the_configured_cache(tmp_path):
    """`peftray registry prune-cache` works on the cache PEFTRAY_CACHE_DIR names: oldest out, recent kept."""
    import json

    cache = AdapterCache(tmp_path / "cache")
    shared = b"{}"
    _, f_old = _adapter(cache, tmp_path, 1, shared, age_s=3000)
    _, f_mid = _adapter(cache, tmp_path, 2, shared, age_s=2000)
    _, f_new = _adapter(cache, tmp_path, 3, shared, age_s=5)
    env = {**os.environ, "PEFTRAY_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "peftray", "--state-dir", str(tmp_path / "s"), "registry",
                           "prune-cache", "--max-gb", str(1.5 * MB / 1e9), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["removed"] == [f_old.name, f_mid.name] and out["bytes_after"] == MB + len(shared)
    assert not f_old.exists() and not f_mid.exists() and f_new.is_dir()
    assert cache.size_bytes() == MB + len(shared)
