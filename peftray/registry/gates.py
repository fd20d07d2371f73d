"""Promotion checks that need no server: metric gates and the serving-base check (pure functions)."""

from __future__ import annotations

from peftray.errors import GateError
from peftray.registry.types import AdapterVersion, MetricGate


def check_gate(gate: MetricGate | None, candidate: AdapterVersion, alias: str,
               current: AdapterVersion | None) -> str:
    """Return a one-line summary of the checks passed; raise GateError naming the metric and the shortfall."""
    if gate is None:
        return "no gate"
    m, what = gate.metric, f"promotion of {candidate.ref} to {alias!r} refused"
    better = ">=" if gate.mode == "max" else "<="
    if m not in candidate.metrics:
        have = ", ".join(sorted(candidate.metrics)) or "none"
        raise GateError(f"{what}: it has no metric {m!r} (its metrics: {have}). Register it with metrics={{{m!r}: ...}} "
                        "or gate on a metric it has.")
    value = candidate.metrics[m]
    passed = []
    if gate.threshold is not None:
        short = _shortfall(value, gate.threshold, gate.mode)
        if short > 0:
            raise GateError(f"{what}: metric {m!r} = {value:g} must be {better} {gate.threshold:g} "
                            f"({gate.direction} is better); it misses the threshold by {short:g}.")
        passed.append(f"{m}={value:g} {better} {gate.threshold:g}")
    if gate.no_worse_than_current:
        passed.append(_no_worse(gate, candidate, current, what))
    return "; ".join(passed)


def _shortfall(value: float, reference: float, mode: str) -> float:
    """How much worse `value` is than `reference` (<= 0 when it is as good or better)."""
    return reference - value if mode == "max" else value - reference


def _no_worse(gate: MetricGate, candidate: AdapterVersion, current: AdapterVersion | None, what: str) -> str:
    m, value = gate.metric, candidate.metrics[gate.metric]
    if current is None:
        return f"{m}: no current holder to compare with"
    if current.version == candidate.version:
        return f"{m}: already the holder"
    if m not in current.metrics:
        return f"{m}: current holder {current.ref} has no {m!r} to compare with"
    ref = current.metrics[m]
    short = _shortfall(value, ref, gate.mode)
    if short > gate.tolerance:
        tol = f", tolerance {gate.tolerance:g}" if gate.tolerance else ""
        raise GateError(f"{what}: metric {m!r} = {value:g} is worse than the current holder {current.ref}'s "
                        f"{ref:g} by {short:g} ({gate.direction} is better{tol}).")
    return f"{m}={value:g} no worse than {current.ref}'s {ref:g}"


def split_base(serving_base: str) -> tuple[str, str | None]:
    """`model@revision` -> (model, revision); a bare model -> (model, None)."""
    base, _, rev = serving_base.partition("@")
    return base.rstrip("/"), rev or None


def check_base(candidate: AdapterVersion, alias: str, serving_base: str | None) -> None:
    """Refuse a version trained on another base model than the one the alias serves."""
    if not serving_base:
        return
    want, want_rev = split_base(serving_base)
    have = (candidate.base_model or "").rstrip("/")
    if have != want:
        raise GateError(
            f"promotion of {candidate.ref} to {alias!r} refused: it was trained on base model {have or '(unknown)'!r} "
            f"but {alias!r} serves {want!r}. Adapters only work on the base model they were trained on: promote a "
            f"version trained on {want!r}, or use another alias for this base.")
    if want_rev and candidate.base_revision and candidate.base_revision != want_rev:
        raise GateError(
            f"promotion of {candidate.ref} to {alias!r} refused: it was trained on {have}@{candidate.base_revision} "
            f"but {alias!r} serves revision {want_rev!r}.")
