"""`peftray promote NAME VERSION --alias A` through the control plane, and the gate flags both promote commands
share (`peftray promote` and `peftray registry promote`): one gate, the same flags, the same JSON."""

from __future__ import annotations

import argparse

from peftray.errors import ConfigError
from peftray.jobspec import MetricGate


def add_gate_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metric gate (the spec's registry.promote.gate)")
    g.add_argument("--metric", help="the metric the gate checks (as registered, e.g. eval_loss)")
    g.add_argument("--mode", choices=("min", "max"),
                   help="min: lower is better (a loss); max: higher is better (accuracy). Required with --metric")
    g.add_argument("--threshold", type=float, help="the metric must reach this value")
    g.add_argument("--no-worse-than-current", "--no-worse", dest="no_worse_than_current", action="store_true",
                   help="the metric must be no worse than the alias's current holder's")
    g.add_argument("--tolerance", type=float, default=0.0, help="slack for --no-worse-than-current (default 0)")


def gate_from_args(args: argparse.Namespace) -> MetricGate | None:
    """The gate the flags describe; None without --metric (other gate flags then are an error)."""
    if args.metric is None:
        if args.threshold is not None or args.no_worse_than_current or args.mode:
            raise ConfigError("--mode/--threshold/--no-worse-than-current need --metric NAME (the metric the gate "
                              "checks).")
        return None
    if args.mode is None:
        raise ConfigError(f"--metric {args.metric} needs --mode min (lower is better, e.g. a loss) or --mode max "
                          "(higher is better, e.g. accuracy).")
    return MetricGate(args.metric, mode=args.mode, threshold=args.threshold,
                      no_worse_than_current=args.no_worse_than_current, tolerance=args.tolerance)


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="registered adapter name")
    p.add_argument("version", type=int)
    p.add_argument("--alias", required=True, help="e.g. staging or production")
    p.add_argument("--reason", help="why (goes to the audit log)")
    add_gate_arguments(p)
    p.set_defaults(func=_promote)


def _promote(args) -> int:
    from peftray.cli.jobs import _client

    gate = gate_from_args(args)
    with _client(args) as client:
        entry = client.promote(args.name, args.version, args.alias, reason=args.reason,
                               gate=gate.to_dict() if gate else None)
    print(f"{args.name}@{args.alias} -> version {entry.get('version', args.version)}")
    return 0
