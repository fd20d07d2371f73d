"""`peftray service up | status | down | token USER | tokens | revoke ID`: the control plane on the local stack."""

from __future__ import annotations

import argparse

from peftray.tables import table


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="start the control plane on the local stack (a no-op if it runs)")
    up.add_argument("--db-url", help="job store URL (default: SQLite in the state folder), "
                                     "e.g. postgresql+psycopg://127.0.0.1:5432/peftray")
    up.add_argument("--max-running", type=int, help="jobs running at once, service-wide (default 2)")
    up.add_argument("--max-running-per-user", type=int, help="jobs running at once per user (default 2)")
    up.add_argument("--warm-runners", type=int, help="processes kept ready for one-worker CPU jobs (default 2; "
                                                     "0: every job is a Ray job with Ray Train workers)")
    up.add_argument("--base-model", action="append", metavar="NAME=PATH_OR_URI", default=[],
                    help="a base model the OpenAI fine-tuning API offers as `model` NAME (repeatable): a folder, "
                         "hub id or s3:// URI")
    up.set_defaults(func=_up)
    sub.add_parser("status", help="print the control plane's pid, URL and health").set_defaults(func=_status)
    sub.add_parser("down", help="stop the control plane (jobs keep running on Ray)").set_defaults(func=_down)
    tok = sub.add_parser("token", help="issue an API token for a user (needs the admin token)")
    tok.add_argument("user")
    tok.add_argument("--admin", action="store_true", help="give the token admin rights")
    tok.add_argument("--ttl", type=parse_ttl, help="expire the token after this long: seconds, or 90m, 12h, 30d")
    tok.set_defaults(func=_token)
    ls = sub.add_parser("tokens", help="list tokens (yours; the admin's lists everyone's)")
    ls.add_argument("--user", help="only this user's tokens (admin)")
    ls.set_defaults(func=_tokens)
    rv = sub.add_parser("revoke", help="revoke a token by its id (from `peftray service tokens`)")
    rv.add_argument("token_id")
    rv.set_defaults(func=_revoke)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """`3600`, `90m`, `12h`, `30d` -> seconds."""
    unit = _UNITS.get(text[-1:].lower())
    try:
        value = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--ttl must be a positive duration like 3600, 90m, 12h or 30d; got {text!r}")
    return value


def _up(args) -> int:
    from peftray.stack import control_plane

    env = {k: str(v) for k, v in (("PEFTRAY_SERVICE_DB_URL", args.db_url),
                                  ("PEFTRAY_SERVICE_MAX_RUNNING", args.max_running),
                                  ("PEFTRAY_SERVICE_MAX_RUNNING_PER_USER", args.max_running_per_user),
                                  ("PEFTRAY_SERVICE_WARM_RUNNERS", args.warm_runners)) if v is not None}
    if args.base_model:
        from peftray.service.settings import parse_base_models

        models = parse_base_models(",".join(args.base_model))  # a bad NAME=PATH fails here, not in the server
        env["PEFTRAY_SERVICE_BASE_MODELS"] = ",".join(f"{k}={v}" for k, v in models.items())
    svc = control_plane.up(args.state_dir, env)
    print(f"control plane at {svc.url} (pid {svc.proc.pid}, log {svc.proc.log})")
    print("the CLI finds it through the stack's state folder; elsewhere set PEFTRAY_SERVICE_URL and PEFTRAY_TOKEN")
    return 0


def _status(args) -> int:
    import httpx

    from peftray.stack import control_plane

    svc = control_plane.status(args.state_dir)
    if svc is None:
        print("the control plane is not running (start it with `peftray service up`)")
        return 3
    healthy = False
    if svc.alive:
        try:
            healthy = httpx.get(f"{svc.url}/healthz", timeout=3).status_code == 200
        except httpx.HTTPError:
            pass
    state = "running" if healthy else ("NOT ANSWERING" if svc.alive else "DEAD")
    print(table(["server", "pid", "state", "url", "log"], [("service", svc.proc.pid, state, svc.url, svc.proc.log)]))
    return 0 if healthy else 3


def _down(args) -> int:
    from peftray.stack import control_plane

    print("stopped the control plane" if control_plane.down(args.state_dir) else "the control plane was not running")
    return 0


def _client(args):
    from peftray.endpoints import load_config
    from peftray.service.client import ServiceClient

    return ServiceClient.from_config(load_config(args.state_dir))


def _token(args) -> int:
    with _client(args) as client:
        print(client.create_token(args.user, admin=args.admin, ttl_s=args.ttl))
    return 0


def _tokens(args) -> int:
    with _client(args) as client:
        rows = client.list_tokens(args.user)
    print(table(["id", "user", "admin", "created", "expires", "state"],
                [(t["id"], t["user"], "yes" if t["is_admin"] else "", t["created_at"], t["expires_at"] or "never",
                  "revoked" if t["revoked_at"] else ("active" if t["active"] else "expired")) for t in rows]))
    return 0


def _revoke(args) -> int:
    with _client(args) as client:
        t = client.revoke_token(args.token_id)
    print(f"revoked {t['id']} ({t['user']}); requests with it now get 401")
    return 0
