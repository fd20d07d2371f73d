"""What the replica engines (text generation, diffusion, classification) share around their background loop: the
queue of waiting requests, refused when full or shutting down; shutdown; the hang detector; and the blocking
helper that tests and benchmarks use to run several requests in the same batches."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

from peftray.serve.slots import OverloadedError


class EngineQueue:
    """A mixin; the engine sets `_cv` (a threading.Condition), `_pending` (a list), `_closed`, `_stepping`,
    `last_step`, `max_queue`, `slots` and `_thread` (its loop), and says whether requests are running
    (`_in_flight`). The text engine, whose requests hear an event per step, has its own `_finish`."""

    def _in_flight(self) -> bool:
        return False

    def _enqueue(self, item: Any) -> Any:
        """Queue `item` for the loop and wake it; OverloadedError when the queue is full or the engine closing."""
        with self._cv:
            if self._closed:
                raise OverloadedError("the engine is shutting down; retry on another replica.")
            if len(self._pending) >= self.max_queue:
                raise OverloadedError(f"{len(self._pending)} requests already wait for this replica "
                                      f"(max_queued {self.max_queue}); retry after a moment.")
            self._pending.append(item)
            self._cv.notify()
        return item

    def _run_all(self, submits: list[Callable[[Callable], Any]]) -> list:
        """Blocking helper: every `submit(on_done)` called at once (under the queue's lock, so the loop takes them
        in one go), then wait for each `on_done(result, error)`; the results in order, or the first error raised."""
        if not submits:
            return []
        done = threading.Event()
        out: dict[int, tuple] = {}

        def waiter(i: int):
            def on_done(result, error) -> None:
                out[i] = (result, error)
                if len(out) == len(submits):
                    done.set()
            return on_done

        with self._cv:
            for i, submit in enumerate(submits):
                submit(waiter(i))
        done.wait()
        for i in range(len(submits)):
            if out[i][1] is not None:
                raise out[i][1]
        return [out[i][0] for i in range(len(submits))]

    def _finish(self, request: Any, result: Any, error: Optional[BaseException]) -> None:
        """End a single-answer request (`done`, `adapter`, `on_done` attributes) once: unpin its slot and call
        `on_done(result, error)`; neither (a cancelled request) answers with an OverloadedError."""
        if request.done:
            return
        request.done = True
        if request.adapter is not None:
            self.slots.release(request.adapter)
        if result is None and error is None:
            error = OverloadedError("the request was cancelled.")
        try:
            request.on_done(result, error)
        except Exception:  # noqa: BLE001 - a consumer that went away must not stop the loop
            pass

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def stalled_for(self) -> float:
        """Seconds the loop has had work but finished no step (0 when idle or moving): a hang detector."""
        if not (self._pending or self._in_flight() or self._stepping):
            return 0.0
        return max(0.0, time.monotonic() - self.last_step)

    @property
    def queued(self) -> int:
        return len(self._pending)
