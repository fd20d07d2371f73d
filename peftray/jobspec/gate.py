"""The promotion gate: one type for the job spec (`registry.promote.gate`), the REST body, both promote
commands and the Python API (`peftray.registry.MetricGate`).

The direction is said with one word, `mode`, as Ray Tune and Ray Train's checkpoint config say it: `min` for a
loss-like metric (lower is better), `max` for an accuracy-like one. It has no default: a gate that guessed the
direction of an unknown metric would pass exactly the versions it should stop.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from peftray.errors import ConfigError

Mode = Literal["min", "max"]


class MetricGate(BaseModel):
    """A gate on one metric of the version being promoted.

    Attributes:
        metric: the metric as recorded at registration (e.g. `eval_loss`).
        mode: `min` (lower is better: losses, perplexity) or `max` (higher is better: accuracy, reward margins).
        threshold: the metric must be <= threshold (`min`) or >= threshold (`max`).
        no_worse_than_current: the metric must be no worse than the current alias holder's.
        tolerance: slack for `no_worse_than_current`, in the metric's units.
    At least one of `threshold` and `no_worse_than_current`; with both, both are checked.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    metric: str = Field(min_length=1)
    mode: Mode
    threshold: float | None = None
    no_worse_than_current: bool = False
    tolerance: float = Field(0.0, ge=0)

    def __init__(self, metric: str | None = None, /, **fields: Any) -> None:
        """`MetricGate("eval_loss", mode="min", threshold=2.5)`; a bad gate is a ConfigError naming the field."""
        if metric is not None:
            fields["metric"] = metric
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            problems = "; ".join(f"`{'.'.join(map(str, e['loc'])) or 'gate'}`: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"MetricGate: {problems}") from None

    @model_validator(mode="after")
    def _checks_something(self) -> "MetricGate":
        if self.threshold is None and not self.no_worse_than_current:
            raise ValueError(f"the gate on {self.metric!r} checks nothing: set `threshold` and/or "
                             "`no_worse_than_current: true`")
        return self

    @property
    def direction(self) -> Literal["higher", "lower"]:
        return "higher" if self.mode == "max" else "lower"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()
