"""`peftray stack up | status | down`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftray import stack
from peftray.tables import table
from peftray.endpoints import SECRET_ENDPOINTS, default_state_dir


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="start the stack (a no-op if it is running)")
    up.add_argument("--db-url", help="MLflow backend store URL (default: SQLite in the state folder), "
                                     "e.g. postgresql+psycopg://127.0.0.1:5432/mlflow")
    up.add_argument("--num-cpus", type=int, help="CPUs the Ray head offers (default: all)")
    up.set_defaults(func=_up)
    st = sub.add_parser("status", help="print the stack's servers, pids and URLs")
    st.add_argument("--json", action="store_true", help="print the endpoints as JSON")
    st.set_defaults(func=_status)
    down = sub.add_parser("down", help="stop exactly the processes this stack started")
    down.set_defaults(func=_down)


def _state_dir(args) -> Path:
    return Path(args.state_dir).absolute() if args.state_dir else default_state_dir()


def _up(args) -> int:
    opts = stack.Options(state_dir=_state_dir(args), db_url=args.db_url, ray_num_cpus=args.num_cpus)
    stack.up(opts, progress=lambda m: print(m, flush=True))
    return _status(argparse.Namespace(state_dir=args.state_dir, json=False))


def _status(args) -> int:
    st = stack.status(_state_dir(args))
    if args.json:
        # The secrets stay in the 0600 state file: the output of status goes to terminals, logs and CI.
        public = {k: v for k, v in st.endpoints.items() if k not in SECRET_ENDPOINTS}
        print(json.dumps({"running": st.running, "endpoints": public}, indent=2))
        return 0 if st.running else 3
    if not st.procs:
        print(f"stack is not running (state folder {st.state_dir})")
        return 3
    ep = st.endpoints
    urls = {"s3": ep.get("s3_endpoint_url"), "mlflow": ep.get("mlflow_tracking_uri"),
            "ray": f"{ep.get('ray_address')}  dashboard {ep.get('ray_dashboard_url')}"}
    rows = [(n, p.pid, "running" if st.alive[n] else "DEAD", urls.get(n, ""), p.log) for n, p in st.procs.items()]
    print(table(["server", "pid", "state", "address", "log"], rows))
    if st.stale:
        print("\nsome servers are gone: run `peftray stack down` then `peftray stack up`")
    return 0 if st.running else 3


def _down(args) -> int:
    stopped = stack.down(_state_dir(args))  # the control plane first, then the servers
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0
