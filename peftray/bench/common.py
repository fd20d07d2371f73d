"""What several benchmarks share: the local stack to run against, and how results are written."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Iterator

from peftray.endpoints import Config, load_config


@contextlib.contextmanager
def local_stack(prefix: str = "peftray-bench-", ray_num_cpus: int = 2) -> Iterator[Config]:
    """The running local stack (`peftray stack up`), or a temporary one for the benchmark's duration."""
    from peftray import stack

    tmp = None
    if not stack.status().running:
        tmp = tempfile.mkdtemp(prefix=prefix)
        stack.up(stack.Options(state_dir=Path(tmp), ray_num_cpus=ray_num_cpus), progress=print)
    try:
        cfg = load_config(tmp)
        cfg.apply_env()
        yield cfg
    finally:
        if tmp:
            import ray

            # leave the temporary cluster before it stops: a driver still connected when its head goes away is
            # ended by Ray itself after 60 s without the GCS, and a busy machine's `stack down` can take that long
            if ray.is_initialized():
                ray.shutdown()
            stack.down(tmp)


def write_results(results: dict, out: str | Path) -> Path:
    """Write `results` as JSON to `out` (its folder made if missing) and say where, with the run's wall time."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {path} ({results['config']['wall_s']} s)")
    return path
