"""What several benchmarks share: the local stack to run against."""

from __future__ import annotations

import contextlib
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
            stack.down(tmp)
