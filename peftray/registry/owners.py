"""Owners of adapter names: the user whose job (or import) first registered a name owns it.

The owner is a tag on the registered model, set when the model is created. Only the owner or an admin adds
versions under the name or moves its aliases; every refused attempt is appended to the name's audit log
(alias `_versions` for registrations), so an admin sees who tried.
"""

from __future__ import annotations

from peftray.endpoints import Config
from peftray.errors import ForbiddenError
from peftray.registry.client import get_config, mlflow_client
from peftray.registry.types import T

TAG_OWNER = T + "owner"
REGISTER_LOG = "_versions"  # the audit "alias" under which refused registrations are recorded
_MISSING = object()


def owner_of(name: str, config: Config | None = None, client=None):
    """The owner tag of registered model `name`; None when it has none; `_MISSING` when no such model."""
    from mlflow.exceptions import MlflowException

    client = client or mlflow_client(get_config(config))
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return _MISSING
        raise
    return (model.tags or {}).get(TAG_OWNER)


def check_owner(name: str, user: str, *, is_admin: bool, action: str, alias: str = REGISTER_LOG,
                config: Config | None = None, client=None) -> None:
    """Allow `user` to `action` on adapter `name` if an admin, its owner, or (for a new name) anyone.

    Raises:
        ForbiddenError: `name` belongs to someone else (or to no user: registered outside the service);
            the refusal is first recorded in the audit log of `name@alias`.
    """
    if is_admin:
        return
    owner = owner_of(name, config, client)
    if owner is _MISSING or owner == user:
        return
    held = f"belongs to {owner!r}" if owner else "was registered by an admin (it has no owner)"
    error = (f"adapter {name!r} {held}; user {user!r} may not {action}. Only its owner or an admin may add "
             f"versions or move aliases: choose another `registry.model_name`, or ask the owner.")
    from peftray.registry.promote import record_refusal

    record_refusal(name, alias, actor=user, error=error, config=config)
    raise ForbiddenError(error)
