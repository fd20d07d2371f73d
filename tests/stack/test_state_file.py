"""The stack's state file has one writer, `peftray.stack.state.update_state`: locked, atomic, private.

Processes of their own (not threads) race on one state folder here, as `stack up`, `service up` and
`serve deploy` do when run from different shells; every key each one wrote must survive.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from peftray.endpoints import STATE_FILE, read_state
from peftray.stack.state import locked, update_state


def _writer(state_dir: str, who: int, times: int) -> None:
    for i in range(times):
        update_state(Path(state_dir), lambda data: data.setdefault("endpoints", {}).update({f"w{who}-{i}": i}))


def test_concurrent_writers_lose_no_key_and_the_file_stays_private(tmp_path):
    assert update_state(tmp_path, lambda data: data.update(procs={}), create=True)
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(str(tmp_path), w, 40)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    endpoints = json.loads((tmp_path / STATE_FILE).read_text())["endpoints"]
    assert set(endpoints) == {f"w{w}-{i}" for w in range(4) for i in range(40)}
    assert (tmp_path / STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.tmp"))


def test_update_without_a_state_file_writes_nothing_unless_asked(tmp_path):
    assert update_state(tmp_path, lambda data: data.update(serve_url="x")) is False
    assert not (tmp_path / STATE_FILE).exists()
    assert update_state(tmp_path, lambda data: data.update(serve_url="x"), create=True) is True
    assert read_state(tmp_path) == {"serve_url": "x"}


def test_an_update_inside_the_held_lock_does_not_wait_on_itself(tmp_path):
    with locked(tmp_path):  # what `stack up` does: hold the folder's lock, then record the state
        assert update_state(tmp_path, lambda data: data.update(a=1), create=True)
    assert read_state(tmp_path) == {"a": 1}


def test_a_failed_change_leaves_the_old_file(tmp_path):
    update_state(tmp_path, lambda data: data.update(a=1), create=True)

    def broken(data):
        data["a"] = 2
        raise RuntimeError("half-way")

    with pytest.raises(RuntimeError):
        update_state(tmp_path, broken)
    assert read_state(tmp_path) == {"a": 1}
