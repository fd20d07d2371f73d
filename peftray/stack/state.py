"""The one writer of the local stack's state file (`<state dir>/stack.json`).

`peftray stack up/down`, the control-plane process and `peftray serve deploy` all record things there
(ports and pids, the service URL and token, the serve URL and key). Every change goes through
`update_state`: under the state folder's lock, read, change, write to a temporary file (mode 0600, it holds
credentials) and rename, so two writers never lose each other's keys and readers never see half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from peftray.endpoints import STATE_FILE, read_state
from peftray.stack import procs


# Locks this thread holds: re-entering one (`stack up` updates the state while holding the folder's lock)
# must not wait on itself, as a second flock on a new file handle would.
_held = threading.local()


@contextlib.contextmanager
def locked(state_dir: Path, name: str = ".lock") -> Iterator[None]:
    """Hold the state folder's lock `name` (one `up`/`down`/state update at a time per folder); re-entrant."""
    state_dir = Path(state_dir).absolute()
    key = str(state_dir / name)
    held = _held.__dict__.setdefault("paths", set())
    if key in held:
        yield
        return
    procs.private_dir(state_dir)  # 0700: the folder holds credentials
    with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_private(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically with mode 0600: readers see the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def update_state(state_dir: Path, change: Callable[[dict[str, Any]], Any], *, create: bool = False) -> bool:
    """Apply `change` to the state file's dict in place, under the lock, and write it back atomically.

    Args:
        state_dir: the stack's state folder.
        change: mutates the dict it is given.
        create: write even when there is no state file yet (only `stack up` creates one).

    Returns:
        True when the file was written; False when there was no state file and `create` is False.
    """
    state_dir = Path(state_dir)
    with locked(state_dir):
        data = read_state(state_dir)
        if not data and not create:
            return False
        change(data)
        write_private(state_dir / STATE_FILE, data)
        return True
