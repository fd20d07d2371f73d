"""`peftray submit`, `peftray jobs list|show|logs|events|cancel`, `peftray promote`: clients of the control plane.

All of them talk to the service over HTTP (`peftray.service.client.ServiceClient`), with the URL and token
from PEFTRAY_SERVICE_URL / PEFTRAY_TOKEN or the local stack's state folder, so they work the same against
the local stack and a remote cluster. `submit` follows the job like `ray job submit`: logs, a progress bar,
exit code 0 if the job succeeded, 1 if it failed, 3 if it was cancelled.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from peftray.tables import table

EXIT = {"succeeded": 0, "failed": 1, "cancelled": 3}
PROGRESS = "PEFTRAY_PROGRESS "


def _client(args):
    from peftray.endpoints import load_config
    from peftray.service.client import ServiceClient

    return ServiceClient.from_config(load_config(args.state_dir))


# ---- peftray submit ---------------------------------------------------------------------------------------------
def register_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec YAML file (e.g. jobs/tiny-lora-instruct.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides, e.g. training.max_steps=10")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--follow", dest="wait", action="store_true", default=True,
                      help="follow the job's logs with a progress bar until it ends (default)")
    mode.add_argument("--no-wait", dest="wait", action="store_false", help="print the job id and return")
    p.add_argument("--quiet", "-q", action="store_true", help="while following, show the progress bar only")
    p.add_argument("--idempotency-key", help="retrying with the same key never creates a second job")
    p.add_argument("--dry-run", action="store_true", help="only validate the spec on the service")
    p.add_argument("--refuse-changed-spec", action="store_true",
                   help="refuse if you ran this job name before with a different spec (default: a new run)")
    p.set_defaults(func=_submit)


def _submit(args) -> int:
    from peftray.jobspec import load_spec

    spec = load_spec(args.spec, args.overrides).model_dump(mode="json")  # fails early, locally, on a bad spec
    local_paths_absolute(spec)
    with _client(args) as client:
        if args.dry_run:
            client.submit(spec, dry_run=True)
            print(f"spec {args.spec} is valid")
            return 0
        job = client.submit(spec, idempotency_key=args.idempotency_key, refuse_changed_spec=args.refuse_changed_spec)
        print(f"submitted job {job['id']} ({job['name']}), {job['state']}", flush=True)
        if not args.wait:
            return 0
        try:
            job = follow(client, job["id"], quiet=args.quiet)
        except KeyboardInterrupt:
            print(f"\nstopped following; the job goes on. Cancel it with `peftray jobs cancel {job['id']}`",
                  file=sys.stderr)
            raise
        print(summary(job))
        return EXIT.get(job["state"], 1)


def local_paths_absolute(spec: dict[str, Any]) -> None:
    """Pin `base_model.path` and `dataset.source` when they name local files: the job's driver runs elsewhere."""
    from peftray.jobspec.load import pin_local_path

    for section, key in (("base_model", "path"), ("dataset", "source")):
        if isinstance(spec.get(section), dict) and key in spec[section]:
            spec[section][key] = pin_local_path(spec[section][key])


def follow(client, job_id: str, quiet: bool = False, out=sys.stdout) -> dict[str, Any]:
    """Stream the job's logs (progress lines drive a tqdm bar) until it ends; return its final record."""
    from tqdm import tqdm

    bar, pending = None, ""
    for chunk in client.logs(job_id, follow=True):
        lines = (pending + chunk).split("\n")
        pending = lines.pop()
        for line in lines:
            at = line.find(PROGRESS)
            if at >= 0:
                bar = _advance(bar, line[at + len(PROGRESS):], out)
            elif not quiet:
                tqdm.write(line, file=out)
    if bar is not None:
        bar.close()
    return client.wait(job_id, timeout=120)


def _advance(bar, raw: str, out):
    from tqdm import tqdm

    try:
        item = json.loads(raw)
    except ValueError:
        return bar
    if bar is None:
        bar = tqdm(total=item.get("total_steps"), unit="step", desc="training", file=out, dynamic_ncols=True)
    step = item.get("step")
    if isinstance(step, int) and step > bar.n:
        bar.update(step - bar.n)
    bar.set_postfix({k: f"{item[k]:.4g}" for k in ("loss", "tokens_per_s") if isinstance(item.get(k), (int, float))})
    return bar


def summary(job: dict[str, Any]) -> str:
    if job["state"] == "succeeded":
        found = f"registered {job['model_name']} version {job['model_version']}" if job.get("model_version") else \
            "no registered version reported"
        return f"job {job['id']} succeeded: MLflow run {job.get('mlflow_run_id')}, {found}"
    text = f"job {job['id']} {job['state']}: {job.get('reason') or ''}"
    return text + (f"\n{job['error']}" if job.get("error") else "")


# ---- peftray jobs ... -------------------------------------------------------------------------------------------
def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="your jobs, newest first")
    ls.add_argument("--state", choices=["queued", "starting", "running", "succeeded", "failed", "cancelled"])
    ls.add_argument("--name")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=_list)
    show = sub.add_parser("show", help="one job: state, transitions, run, version, error")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true", help="the whole record as JSON")
    show.set_defaults(func=_show)
    logs = sub.add_parser("logs", help="the job's output")
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep streaming until the job ends")
    logs.set_defaults(func=_logs)
    ev = sub.add_parser("events", help="state changes and progress as JSON lines")
    ev.add_argument("job_id")
    ev.add_argument("-f", "--follow", action="store_true")
    ev.set_defaults(func=_events)
    cancel = sub.add_parser("cancel", help="cancel a job (stops its Ray job and workers)")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=_cancel)


def _list(args) -> int:
    with _client(args) as client:
        jobs = client.list(state=args.state, name=args.name, limit=args.limit)["jobs"]
    rows = [(j["id"], j["name"], j["owner"], j["state"], j["created_at"], _steps(j), j.get("model_version"))
            for j in jobs]
    print(table(["id", "name", "owner", "state", "created", "step", "version"], rows))
    return 0


def _steps(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    return f"{p.get('step')}/{p.get('total_steps')}" if p else ""


def _show(args) -> int:
    with _client(args) as client:
        job = client.get(args.job_id)
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    fields = ("id", "name", "owner", "state", "reason", "ray_job_id", "mlflow_run_id", "model_name", "model_version")
    print(table(["field", "value"], [(k, job.get(k)) for k in fields]))
    print()
    print(table(["at", "state", "reason"], [(t["at"], t["state"], t["reason"]) for t in job["transitions"]]))
    if job.get("error"):
        print(f"\nerror:\n{job['error']}")
    return 0


def _logs(args) -> int:
    with _client(args) as client:
        for chunk in client.logs(args.job_id, follow=args.follow):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    return 0


def _events(args) -> int:
    with _client(args) as client:
        for event in client.events(args.job_id, follow=args.follow):
            print(json.dumps(event), flush=True)
    return 0


def _cancel(args) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id)
    print(f"job {job['id']}: {job['state']}" + (" (cancel requested; Ray is stopping it)" if job["state"] not in
                                                 EXIT else ""))
    return 0
