"""`peftray bench service`: the control plane's overhead, each number beside its baseline from the same run.

1. Submit-to-first-training-step latency of a tiny LoRA job: through the service (POST /v1/jobs, scheduler,
   Ray Jobs API, trainer) vs. the same entrypoint handed straight to Ray's `JobSubmissionClient`.
2. API latency p50/p99 under 8 concurrent clients (200 submissions + 200 listings, validation and storage
   only: the service admits nothing) vs. the service's no-op `/healthz` under the same load.
3. Phases: the same tiny job submitted `--repeats` times, one after another, broken down from the timestamps
   the job records (driver start, trainer start, model and data load, first step, checkpoint upload,
   registration, ...); submit -> registered version.
4. Concurrent: `--concurrent` (8) such jobs submitted at once: wall from the first submit to the last
   registered version, and the overhead per extra job over one job alone (arm 3's median).

Uses the running local stack (`peftray stack up`), or starts a temporary one. Writes bench-results/service.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from peftray.tables import table
from peftray.endpoints import load_config


ARMS = ("api", "first-step", "phases", "concurrent")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _tiny_spec(name: str, model: Path, data: Path) -> dict[str, Any]:
    return {"name": name, "base_model": {"path": str(model)},
            "adapter": {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
            "dataset": {"source": str(data), "format": "instruction", "max_seq_len": 32},
            "training": {"max_steps": 3, "batch_size": 4}, "resources": {"num_workers": 1},
            "registry": {"model_name": name}}


def _first_step_direct(svc_settings, spec: dict[str, Any]) -> float:
    """Baseline: the trainer entrypoint submitted straight to Ray and its log tailed (as `ray job submit` does);
    seconds until the first progress line."""
    import asyncio

    from peftray.service.executor import RayExecutor

    ex = RayExecutor(svc_settings)
    job_id = "bench-" + uuid.uuid4().hex[:8]

    async def first_progress(ray_id: str) -> bool:
        seen = ""
        async for chunk in ex.client.tail_job_logs(ray_id):
            seen = seen[-4096:] + chunk
            if "PEFTRAY_PROGRESS " in seen:
                return True
        return False

    t0 = time.perf_counter()
    ray_id = ex.submit(job_id, "bench", spec, owner_is_admin=True)  # the service arm runs as admin: the same rights
    if not asyncio.run(first_progress(ray_id)):
        raise RuntimeError(f"baseline job ended without a training step:\n{ex.logs(ray_id)[-3000:]}")
    took = time.perf_counter() - t0
    _drain(lambda: ex.info(ray_id).status not in ("PENDING", "RUNNING"))
    return took


def _first_step_service(client, spec: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    job = client.submit(spec)
    for event in client.events(job["id"], follow=True):
        if event["kind"] == "progress":
            took = time.perf_counter() - t0
            break
        if event.get("state") in ("failed", "cancelled"):
            raise RuntimeError(f"service job {job['id']} {event['state']}: {client.get(job['id']).get('error')}")
    else:
        raise RuntimeError(f"service job {job['id']} ended without a training step")
    _drain(lambda: client.get(job["id"])["state"] in ("succeeded", "failed", "cancelled"))
    return took


def _drain(done, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.5)


def _load(url: str, token: str, spec: dict[str, Any], clients: int, per_client: int) -> dict[str, list[float]]:
    """8 clients: each POSTs a job and lists jobs `per_client` times, then hits /healthz as many times."""
    lat: dict[str, list[float]] = {"submit": [], "list": [], "healthz": []}
    lock = threading.Lock()

    def work(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            for n in range(per_client):
                for kind, call in (("submit", lambda: http.post("/v1/jobs", json={**spec, "name": f"load-{i}-{n}"})),
                                   ("list", lambda: http.get("/v1/jobs", params={"limit": 20}))):
                    t0 = time.perf_counter()
                    call().raise_for_status()
                    with lock:
                        lat[kind].append(time.perf_counter() - t0)
            for _ in range(2 * per_client):
                t0 = time.perf_counter()
                http.get("/healthz").raise_for_status()
                with lock:
                    lat["healthz"].append(time.perf_counter() - t0)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, range(clients)))
    return lat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftray bench service", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--submissions", type=int, default=200, help="total POSTs under load")
    parser.add_argument("--repeats", type=int, default=2, help="first-step measurements per side (order alternates)")
    parser.add_argument("--concurrent", type=int, default=8, help="jobs submitted at once in the concurrent arm")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--out", default="bench-results/service.json")
    args = parser.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    if not set(args.arms) <= set(ARMS):
        parser.error(f"--arms: unknown {sorted(set(args.arms) - set(ARMS))}; choose from {','.join(ARMS)}")
    with _stack() as cfg, tempfile.TemporaryDirectory(prefix="peftray-bench-service-") as tmp:
        result = _run(cfg, Path(tmp), args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _print(result)
    print(f"\nwrote {out}")
    return 0


class _stack:
    """The running local stack, or a temporary one for the benchmark's duration."""

    def __enter__(self):
        from peftray import stack

        self.tmp = None
        if not stack.status().running:
            self.tmp = tempfile.mkdtemp(prefix="peftray-bench-stack-")
            stack.up(stack.Options(state_dir=Path(self.tmp), ray_num_cpus=8), progress=print)
        cfg = load_config(self.tmp)
        cfg.apply_env()
        return cfg

    def __exit__(self, *exc):
        if self.tmp:
            from peftray import stack

            stack.down(self.tmp)


def _run(cfg, tmp: Path, args) -> dict[str, Any]:
    from peftray.base_models import make_tiny_llama

    model = make_tiny_llama(tmp / "tiny-llama")
    data = Path(__file__).resolve().parents[2] / "jobs" / "data" / "tiny_instruct.jsonl"
    spec = _tiny_spec(f"bench-{uuid.uuid4().hex[:6]}", model, data)
    result: dict[str, Any] = {}
    if "api" in args.arms:
        result.update(_api_latency(cfg, tmp, spec, args))
    if "first-step" in args.arms:
        result.update(_first_step(cfg, tmp, spec, args.repeats))
    if {"phases", "concurrent"} & set(args.arms):
        result.update(_phases(cfg, tmp, spec, args))
    return result


PATHS = (("warm", "2"), ("ray", "0"))  # (arm, PEFTRAY_SERVICE_WARM_RUNNERS): warm runners vs. Ray Jobs + Ray Train


def _phases(cfg, tmp: Path, spec: dict[str, Any], args) -> dict[str, Any]:
    """Arms 3 and 4 on two services side by side: one with warm runners, one without (the baseline, every job a
    Ray job with a Ray Train worker). Sequential jobs alternate between them; the concurrent arm runs each."""
    from peftray.bench import _service_phases as phases
    from peftray.service.client import ServiceClient
    from peftray.stack.control_plane import start_service

    n = str(max(1, args.concurrent))
    out: dict[str, Any] = {}
    svcs = {arm: start_service(tmp / f"phases-{arm}", {
        "PEFTRAY_SERVICE_MAX_RUNNING": n, "PEFTRAY_SERVICE_MAX_RUNNING_PER_USER": n, "PEFTRAY_SERVICE_POLL_S": "0.2",
        "PEFTRAY_SERVICE_WARM_RUNNERS": warm}, state_dir=cfg.state_dir) for arm, warm in PATHS}
    clients = {arm: ServiceClient(svc.url, svc.admin_token, timeout=120) for arm, svc in svcs.items()}
    try:
        # "a warm local stack": the first job on each service (its runner's, or Ray's, caches) is not measured
        out["first_job_s"] = {arm: phases.sequential(c, {**spec, "name": f"{spec['name']}-{arm}-first"}, 1)
                              ["submit_to_registered_s"] for arm, c in clients.items()}
        if "phases" in args.arms:
            runs: dict[str, list] = {arm: [] for arm in clients}
            for i in range(args.repeats):  # alternate which path goes first
                for arm in list(clients)[:: 1 if i % 2 == 0 else -1]:
                    runs[arm].append(phases.run_job_through_service(
                        clients[arm], {**spec, "name": f"{spec['name']}-{arm}-p{i}"}))
            out["phases"] = {arm: phases.summarize(r) for arm, r in runs.items()}
        if "concurrent" in args.arms:
            out["concurrent"] = {}
            for arm, client in clients.items():
                single = out.get("phases", {}).get(arm, {}).get("submit_to_registered_s")
                out["concurrent"][arm] = phases.concurrent(client, {**spec, "name": f"{spec['name']}-{arm}"},
                                                           args.concurrent, single)
    except RuntimeError as exc:
        out["phases_error"] = str(exc)[:2000]
    finally:
        for c in clients.values():
            c.close()
        for svc in svcs.values():
            svc.stop()
    return out


def _api_latency(cfg, tmp: Path, spec: dict[str, Any], args) -> dict[str, Any]:
    from peftray.stack.control_plane import start_service

    idle = start_service(tmp / "load", {"PEFTRAY_SERVICE_MAX_RUNNING": "0"}, state_dir=cfg.state_dir)
    try:
        lat = _load(idle.url, idle.admin_token, spec, args.clients, max(1, args.submissions // args.clients))
    finally:
        idle.stop()
    api = {k: {"n": len(v), "p50_ms": 1000 * _pct(v, 0.5), "p99_ms": 1000 * _pct(v, 0.99)} for k, v in lat.items()}
    return {"api_latency": api, "clients": args.clients,
            "ratios_vs_healthz_p50": {k: api[k]["p50_ms"] / api["healthz"]["p50_ms"] for k in ("submit", "list")}}


def _first_step(cfg, tmp: Path, spec: dict[str, Any], repeats: int) -> dict[str, Any]:
    from peftray.service.client import ServiceClient
    from peftray.stack.control_plane import start_service
    from peftray.service.settings import ServiceSettings

    settings = ServiceSettings(config=cfg, db_url="sqlite://", run_scheduler=False)
    svc = start_service(tmp / "run", {"PEFTRAY_SERVICE_MAX_RUNNING": "1", "PEFTRAY_SERVICE_POLL_S": "0.2"},
                        state_dir=cfg.state_dir)
    direct, served = [], []
    try:
        with ServiceClient(svc.url, svc.admin_token) as client:
            for i in range(repeats):  # alternate the order, so neither side always runs on warmer caches
                runs = [lambda: direct.append(_first_step_direct(settings, {**spec, "name": f"{spec['name']}-d{i}"})),
                        lambda: served.append(_first_step_service(client, {**spec, "name": f"{spec['name']}-s{i}"}))]
                for run in runs[:: 1 if i % 2 == 0 else -1]:
                    run()
    except RuntimeError as exc:  # a job killed by the machine (e.g. Ray's OOM killer): keep the API numbers
        return {"first_step_error": str(exc)[:2000]}
    finally:
        svc.stop()
    return {"first_step_s": {
        "service": statistics.median(served), "direct_ray_jobs": statistics.median(direct),
        "ratio": statistics.median(served) / statistics.median(direct),
        "service_runs": served, "direct_runs": direct}}


def _print(r: dict[str, Any]) -> None:
    _print_phases(r)
    if "first_step_s" in r:
        fs = r["first_step_s"]
        print(table(["submit -> first training step", "seconds"], [
            ("through the service", f"{fs['service']:.2f}"),
            ("straight to Ray Jobs (baseline)", f"{fs['direct_ray_jobs']:.2f}"),
            ("ratio service / baseline", f"{fs['ratio']:.2f}")]))
    elif "first_step_error" in r:
        print(f"submit -> first training step: not measured ({r.get('first_step_error')})")
    if "api_latency" not in r:
        return
    print()
    rows = [(k, v["n"], f"{v['p50_ms']:.1f}", f"{v['p99_ms']:.1f}") for k, v in r["api_latency"].items()]
    print(table([f"API under {r['clients']} clients", "requests", "p50 ms", "p99 ms"], rows))
    print("p50 vs /healthz (baseline): " + ", ".join(f"{k} x{v:.1f}" for k, v in r["ratios_vs_healthz_p50"].items()))


def _print_phases(r: dict[str, Any]) -> None:
    if "phases_error" in r:
        print(f"phases: not measured ({r['phases_error']})\n")
    names = {"warm": "warm runner", "ray": "Ray job + Ray Train (baseline)"}
    if "first_job_s" in r:
        print("first job on a fresh service (not measured below): " + ", ".join(
            f"{names[a]} {v:.2f} s" for a, v in r["first_job_s"].items()) + "\n")
    if "phases" in r:
        p = r["phases"]
        arms = list(p)
        order = list(dict.fromkeys(n for a in arms for n in p[a]["phases_s"]))
        rows = [(name, *(f"{p[a]['phases_s'][name]:.2f}" if name in p[a]["phases_s"] else "-" for a in arms))
                for name in order]
        rows += [("= submit -> registered version", *(f"{p[a]['submit_to_registered_s']:.2f}" for a in arms)),
                 ("  submit -> the service shows succeeded", *(f"{p[a]['submit_to_succeeded_s']:.2f}" for a in arms))]
        if {"warm", "ray"} <= set(arms):
            rows.append(("  ratio warm / baseline", f"{p['warm']['submit_to_registered_s'] / p['ray']['submit_to_registered_s']:.2f}", ""))
        n = len(p[arms[0]]["runs"])
        print(table([f"one tiny job, phases (median of {n}, alternated)", *(names[a] for a in arms)], rows) + "\n")
    if "concurrent" in r:
        for arm, c in r["concurrent"].items():
            rows = [("first submit -> last registered version", f"{c['wall_first_submit_to_last_registered_s']:.2f}"),
                    ("first submit -> last shown succeeded", f"{c['wall_first_submit_to_last_succeeded_s']:.2f}")]
            if "per_extra_job_s" in c:
                rows += [("one job alone (phases arm)", f"{c['single_job_s']:.2f}"),
                         ("overhead per extra job", f"{c['per_extra_job_s']:.2f}")]
            print(table([f"{c['jobs']} tiny jobs at once: {names[arm]}", "seconds"], rows) + "\n")
