"""The control plane as a Ray Serve application: the same FastAPI app, in one or more Serve replicas.

    from ray import serve
    serve.run(peftray.service.serve_app.build(), name="peftray-control-plane", route_prefix="/control")

Every replica opens the same SQL job store and runs its own scheduler thread; claims and state changes are
compare-and-set in the database, so replicas never start a job twice. Use a database every replica reaches
(PostgreSQL in production; the SQLite default only works when all replicas share one machine).
"""

from __future__ import annotations

from peftray.service.settings import ServiceSettings


def build(settings: ServiceSettings | None = None, num_replicas: int = 1):
    """A bound Serve deployment of the control plane (settings default to `ServiceSettings.from_env()`)."""
    from ray import serve

    from peftray.service.app import create_app

    settings = settings or ServiceSettings.from_env()
    api = create_app(settings, manage_state=False)

    @serve.deployment(name="peftray-control-plane", num_replicas=num_replicas)
    @serve.ingress(api)
    class ControlPlane:
        """Each replica opens the store and starts its scheduler on its first request (see `runtime.state_of`)."""

    return ControlPlane.bind()
