"""What a running control plane holds on `app.state`: settings, job store, executor, scheduler thread."""

from __future__ import annotations

import logging
import threading
from typing import Any

from peftray.service.executor import RayExecutor
from peftray.service.scheduler import Scheduler
from peftray.service.settings import ServiceSettings
from peftray.errors import ConflictError
from peftray.service.store import ACTIVE, CANCELLED, QUEUED, JobRecord, JobStore

_init_lock = threading.Lock()


def start_state(app: Any, settings: ServiceSettings) -> None:
    """Open the job store, make the executor and start the scheduler thread on `app.state`."""
    app.state.settings = settings
    app.state.store = JobStore(settings.db_url)
    app.state.executor = RayExecutor(settings)
    app.state.scheduler = Scheduler(app.state.store, app.state.executor, settings)
    if settings.run_scheduler:
        app.state.scheduler.start()
        if app.state.executor.warm is not None and settings.max_running > 0:  # jobs of one CPU worker start in a runner started now
            threading.Thread(target=_start_runners, args=(app.state.executor.warm,), name="peftray-runners",
                             daemon=True).start()
    # The first submission checks the adapter name in MLflow: import its client now, not in that request.
    threading.Thread(target=_warm_imports, name="peftray-warm-imports", daemon=True).start()


def _warm_imports() -> None:
    import mlflow  # noqa: F401
    import mlflow.exceptions  # noqa: F401


def _start_runners(pool) -> None:
    try:
        pool.warm()
    except Exception:  # noqa: BLE001 - no Ray yet: the first warm job starts them
        logging.getLogger("peftray.service").warning("could not start warm runners yet", exc_info=True)


def stop_state(app: Any) -> None:
    app.state.scheduler.stop()
    if app.state.executor.warm is not None:
        app.state.executor.warm.close()
    app.state.store.close()


def state_of(app: Any) -> Any:
    """`app.state`, started on first use where no lifespan started it (a Ray Serve replica's copy of the app)."""
    if not hasattr(app.state, "store"):
        with _init_lock:
            if not hasattr(app.state, "store"):
                start_state(app, app.state.settings)
    return app.state


def request_cancel(state: Any, job_id: str, user: str) -> JobRecord:
    """Cancel a job: a queued one at once; a started one by stopping its Ray job (and so its workers).

    Returns the job as it is now; a started job shows `cancelled` once the scheduler sees Ray stopped it.

    Raises:
        ConflictError: the job already succeeded or failed.
    """
    store, executor = state.store, state.executor
    if store.transition(job_id, CANCELLED, f"cancelled by {user}", [QUEUED]):
        return store.get(job_id, with_transitions=True)
    job = store.get(job_id)
    if job.state in ACTIVE:
        store.update(job.id, cancel_requested=True)
        if job.ray_job_id:
            executor.stop(job.ray_job_id)  # the scheduler records `cancelled` once Ray shows it stopped
        return store.get(job.id, with_transitions=True)
    if job.state == CANCELLED:
        return store.get(job.id, with_transitions=True)
    raise ConflictError(f"job {job.id} already ended ({job.state}); there is nothing to cancel")
