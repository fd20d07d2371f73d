"""The control plane: a REST API that turns job specs into Ray jobs and remembers every one of them.

    create_app(settings) -> FastAPI        ServiceSettings.from_env()
    JobStore(db_url)                       RayExecutor(settings)
    ServiceClient(url, token)              (HTTP client used by the CLI and benchmarks)

Run it with `peftray service up` (local stack), `python -m peftray.service --host H --port P`, or as a Ray Serve
application: `serve.run(peftray.service.serve_app.build(), route_prefix="/control")`.
"""

from __future__ import annotations

from peftray.service.client import ServiceClient
from peftray.service.settings import ServiceSettings

__all__ = ["ServiceClient", "ServiceSettings", "create_app"]


def create_app(settings: ServiceSettings | None = None):
    """The FastAPI app (imported lazily: the client side needs no FastAPI)."""
    from peftray.service.app import create_app as _create

    return _create(settings)
