"""The compiled CPU kernel for small mixed-adapter batches (decode steps), with the pure-PyTorch path as fallback.

A decode step of a mixed batch runs every LoRA projection on a handful of rows. Through `bmm` each projection
pays ~2 gathers, 2 batched matmuls and a scatter (~6 dispatches of 10-40 µs on CPU); the arithmetic is a few
microseconds. `_lora_rows.c` does a row's A and B products in one call, over rows sorted by adapter, and adds
straight into the base output; one call can serve several projections that read the same input (q, k, v).

The C file is compiled on first use with the system C compiler (`cc`, or `$CC`) into the user's cache
(`$PEFTRAY_CACHE_DIR/kernels`, default `~/.cache/peftray/kernels`), keyed by the source, the compiler and the
CPU, then loaded with ctypes (no Python headers or torch headers needed, so it builds in well under a second).
It links the OpenMP runtime torch already loaded, so `torch.set_num_threads` governs it too. No compiler, a
failed build, or `PEFTRAY_CPU_KERNEL=0` leaves `available()` False and callers use the PyTorch path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_lora_rows.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
MAX_RANK = 256  # the C kernel's per-row scratch (keep in step with MAX_RANK in _lora_rows.c)
ENTRY = 7  # int64 values per projection in the kernel's table (keep in step with ENTRY in _lora_rows.c)
_lock = threading.Lock()
_state: dict = {}
_switch = {"on": True}


def enabled() -> bool:
    """Whether `lora_delta` may use the kernel (default yes; see `use`)."""
    return _switch["on"]


@contextlib.contextmanager
def use(on: bool):
    """Turn the kernel on or off for `lora_delta`, process-wide (also for a serving engine's own thread):
    benchmarks compare both paths this way."""
    before = _switch["on"]
    _switch["on"] = on
    try:
        yield
    finally:
        _switch["on"] = before


def _cache_dir() -> Path:
    root = os.environ.get("PEFTRAY_CACHE_DIR") or os.path.join(Path.home(), ".cache", "peftray")
    return Path(root) / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another sharing the cache."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "|" + "|".join(lines)


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(cc: str) -> Path:
    source = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(_FLAGS).encode(),
                                     _cpu_id().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"lora_rows-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first uses (replicas, workers) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load():
    """The kernel function, or None (no compiler, build failed, or disabled): built and loaded once per process."""
    fn = _state.get("fn", _load)  # every projection of every decode step asks: no lock once it is known
    if fn is not _load:
        return fn
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn = None
        if os.environ.get("PEFTRAY_CPU_KERNEL", "1") != "0":
            cc = _compiler()
            if cc is None:
                log.info("no C compiler found: mixed-adapter decode uses the PyTorch path")
            else:
                try:
                    torch.get_num_threads()  # torch's OpenMP runtime is loaded first, so ours links to it
                    lib = ctypes.CDLL(str(_build(cc)))
                    fn = lib.lora_group_f32
                    p, i = ctypes.c_void_p, ctypes.c_int64
                    fn.argtypes = [p, i, i, p, i, p, p, p, i]
                    fn.restype = None
                except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback
                    log.warning("CPU LoRA kernel unavailable (%s); using the PyTorch path", exc)
                    fn = None
        _state["fn"] = fn
        return fn


def available() -> bool:
    """True when the compiled kernel is loaded (building it on the first call)."""
    return _load() is not None


def lora_rows_(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scaling: torch.Tensor,
               slots: list[int]) -> torch.Tensor:
    """out[i] += scaling[s] * (x[i] @ a[s].T) @ bt[s] for every row i with slot s = slots[i] >= 0; in place.

    Args:
        out: [M, out] contiguous float32 on the CPU, the base output to add into.
        x: [M, in] contiguous float32.
        a: [N, r, in] contiguous; bt: [N, r, out] contiguous (B transposed); scaling: [N] contiguous float32.
        slots: the adapter slot of each of the M rows, -1 for none.

    Raises:
        RuntimeError: the kernel is not available (check `available()` first).
        ValueError: tensors not in the layout above.
    """
    from peftray.ops.plan import RowPlan

    fn = _load()
    if fn is None:
        raise RuntimeError("the CPU LoRA kernel is not available; check peftray.ops.cpu_kernel.available() first")
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in (out, x, a, bt, scaling)):
        raise ValueError("lora_rows_: every tensor must be contiguous and on the CPU")
    if {out.dtype, x.dtype, a.dtype, bt.dtype, scaling.dtype} != {torch.float32}:
        raise ValueError("lora_rows_: out, x, a, bt and scaling must be float32")
    n, r, n_in = a.shape
    if bt.shape[:2] != (n, r) or x.shape[1] != n_in or out.shape[1] != bt.shape[2] or r > MAX_RANK \
            or out.shape[0] != x.shape[0] or len(slots) != x.shape[0] or max(slots, default=-1) >= n:
        raise ValueError(f"lora_rows_: shapes do not fit: out {tuple(out.shape)}, x {tuple(x.shape)}, a "
                         f"{tuple(a.shape)}, bt {tuple(bt.shape)}, {len(slots)} slots (rank <= {MAX_RANK})")
    return call(fn, out, x, a, bt, scaling, RowPlan.from_indices(slots).kernel_segments(1))


def call(fn, out, x, a, bt, scaling, segments) -> torch.Tensor:
    """The kernel without the checks, for callers that made them (`peftray.ops.lora_delta`); fn = `_load()`,
    segments = `RowPlan.kernel_segments(tokens)`."""
    rows, starts, seg_slots = segments
    n_in = x.shape[1]
    table = (ctypes.c_int64 * ENTRY)(*weights_entry(a, bt, scaling), out.data_ptr(), out.shape[1])
    fn(x.data_ptr(), n_in, n_in, table, 1, rows.data_ptr(), starts.data_ptr(), seg_slots.data_ptr(),
       seg_slots.numel())
    return out


def weights_entry(a: torch.Tensor, bt: torch.Tensor, scaling: torch.Tensor) -> tuple[int, int, int, int, int]:
    """One projection's stacked weights as the kernel's table names them (addresses of a [N, r, in], bt [N, r,
    out] and scaling [N], then r and out): made once per stack, valid while those tensors live."""
    return a.data_ptr(), bt.data_ptr(), scaling.data_ptr(), a.shape[1], bt.shape[2]


def run(fn, x: torch.Tensor, table: list[int], segments: tuple[int, int, int, int]) -> None:
    """out += the LoRA term for every projection of `table` (ENTRY ints each: a `weights_entry`, then the
    address of its contiguous float32 output with rows like x's, and that output's row length), all reading x
    (contiguous float32); segments = `RowPlan.kernel_args(tokens)`. No checks: the caller made them."""
    n_in = x.shape[-1]
    fn(x.data_ptr(), n_in, n_in, (ctypes.c_int64 * len(table))(*table), len(table) // ENTRY, *segments)
