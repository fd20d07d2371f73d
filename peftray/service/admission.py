"""The checks a submitted spec passes before anything is stored: what it reads, whose adapter name it writes,
and (on request) that its name is not already a run of a different spec.

A run is identified by (owner, job name, spec fingerprint): the trainer keeps each one's checkpoints and MLflow
run apart, so the same name with a changed spec trains afresh. `refuse_changed_spec` turns that case into a
409 instead, for users who want a name to mean one spec.
"""

from __future__ import annotations

from peftray.errors import ConflictError
from peftray.jobspec import JobSpec
from peftray.registry.owners import check_owner
from peftray.service.auth import Principal
from peftray.service.settings import ServiceSettings
from peftray.service.store import JobStore


def admit(spec: JobSpec, who: Principal, settings: ServiceSettings, store: JobStore,
          refuse_changed_spec: bool = False) -> JobSpec:
    """The spec to store (local paths resolved), or a 400/403/409 error naming what is wrong."""
    if not who.is_admin:
        spec = settings.policy().check(spec, who.user)
    check_owner(spec.model_name, who.user, is_admin=who.is_admin, action="register a new version of it",
                config=settings.config)
    if refuse_changed_spec:
        _check_same_spec(spec, who.user, store)
    return spec


def _check_same_spec(spec: JobSpec, owner: str, store: JobStore) -> None:
    earlier, _ = store.list_jobs(owner=owner, name=spec.name, limit=1)
    if earlier and JobSpec.model_validate(earlier[0].spec).fingerprint() != spec.fingerprint():
        raise ConflictError(
            f"job name {spec.name!r} was used for a different spec (job {earlier[0].id}) and refuse_changed_spec "
            "is set. Submit under a new `name`, or without refuse_changed_spec to start a new run of this name.")
