"""`/v1/adapters`: the registry's list, versions, promote and rollback over HTTP.

Anyone with a token may read the registry. Moving an alias needs the admin token or the adapter's owner (the
user whose job first registered the name, `peftray.registry.owners`); a refusal is recorded in the audit log.
Having submitted a job that names the adapter is not enough: that job may have failed, or may be someone
else's attempt to take the name.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from peftray import registry
from peftray.registry.owners import check_owner
from peftray.service.auth import Principal
from peftray.service.runtime import state_of


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(gt=0)
    alias: str
    reason: str | None = None
    gate: registry.MetricGate | None = None  # the spec's gate, the same JSON


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: str
    reason: str | None = None


def _check_may_move(who: Principal, name: str, alias: str, config) -> None:
    check_owner(name, who.user, is_admin=who.is_admin, action=f"move its alias {alias!r}", alias=alias,
                config=config)


def install(app: FastAPI, principal: Callable[..., Principal]) -> None:
    """Add the adapter routes to `app`."""

    @app.get("/v1/adapters", tags=["adapters"])
    async def list_adapters(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        cfg = state_of(request.app).settings.config
        items = await run_in_threadpool(registry.list_adapters, cfg)
        return {"adapters": [a.to_dict() for a in items]}

    @app.get("/v1/adapters/{name}/versions", tags=["adapters"])
    async def list_versions(name: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        cfg = state_of(request.app).settings.config
        items = await run_in_threadpool(registry.list_versions, name, cfg)
        return {"versions": [v.to_dict() for v in items]}

    @app.post("/v1/adapters/{name}/promote", tags=["adapters"])
    async def promote(name: str, body: PromoteBody, request: Request,
                      who: Principal = Depends(principal)) -> dict[str, Any]:
        """Point `name@alias` at `version` after the optional metric gate passes (409 if it refuses)."""
        state = state_of(request.app)
        await run_in_threadpool(_check_may_move, who, name, body.alias, state.settings.config)
        gate = body.gate
        return await run_in_threadpool(lambda: registry.promote(
            name, body.version, body.alias, gate=gate, actor=who.user, reason=body.reason,
            config=state.settings.config))

    @app.post("/v1/adapters/{name}/rollback", tags=["adapters"])
    async def rollback(name: str, body: RollbackBody, request: Request,
                       who: Principal = Depends(principal)) -> dict[str, Any]:
        """Move `name@alias` back to its previous holder."""
        state = state_of(request.app)
        await run_in_threadpool(_check_may_move, who, name, body.alias, state.settings.config)
        return await run_in_threadpool(lambda: registry.rollback(
            name, body.alias, actor=who.user, reason=body.reason, config=state.settings.config))
