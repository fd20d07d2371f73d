"""What the scheduler learns of a started job, from Ray Jobs or from a warm runner."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RayJobInfo:
    """What Ray says about a job: status is PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""

    status: str
    message: str | None = None
