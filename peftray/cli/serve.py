"""`peftray serve deploy serve.yaml | status | down [NAME]`: multi-adapter serving on Ray Serve."""

from __future__ import annotations

import argparse
import json


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="serve_cmd", metavar="SUBCOMMAND")
    d = sub.add_parser("deploy", help="deploy (or update) the application of a serve spec and wait until it runs")
    d.add_argument("spec", help="serve.yaml (see jobs/serve-tiny.yaml)")
    d.add_argument("--wait", type=float, default=300.0, help="seconds to wait for RUNNING (default 300)")
    d.set_defaults(func=_deploy)
    s = sub.add_parser("status", help="state of every serve application and its replicas")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_status)
    x = sub.add_parser("down", help="delete one application, or all of them and Serve itself")
    x.add_argument("name", nargs="?", help="application name (default: all)")
    x.set_defaults(func=_down)


def _deploy(args) -> int:
    from peftray.serve import deploy

    dep = deploy(args.spec, wait_s=args.wait)
    print(f"serving {dep.name!r} at {dep.url}/v1 (OpenAI API)")
    print(f"API key: {dep.api_key}   (also in the stack state: PEFTRAY_SERVE_API_KEY)")
    return 0


def _status(args) -> int:
    from peftray.tables import table
    from peftray.serve import status

    apps = status()
    if args.json:
        print(json.dumps(apps, indent=2))
        return 0
    if not apps:
        print("no serve applications")
        return 0
    rows = [[name, app["status"], dep, d["status"], ", ".join(f"{k}={v}" for k, v in d["replicas"].items())]
            for name, app in apps.items() for dep, d in app["deployments"].items()]
    print(table(["app", "status", "deployment", "deployment status", "replicas"], rows))
    return 0


def _down(args) -> int:
    from peftray.serve import down

    removed = down(args.name)
    print(f"removed: {', '.join(removed) or 'nothing'}")
    return 0
