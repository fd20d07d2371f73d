"""`peftray bench service` arms 3 and 4: where a tiny job's seconds go, and what each extra job at once costs.

Each phase is read from the wall-clock timestamps the job itself recorded (the `timings` of its result record,
`jobs/<id>/result.json`: the driver's marks and the training loop's) plus the submit and "the service shows it
succeeded" times taken here; one machine, one clock.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# (phase, from mark, to mark): consecutive marks of one job; a mark the job did not record skips its phase.
PHASES = (
    ("queue + start of the driver (a Ray job's; a warm runner's: the job begins)", "submit", "driver_start"),
    ("driver imports (python, torch, peftray; none on a warm runner)", "driver_start", "run_job"),
    ("connect to Ray", "run_job", "ray_connected"),
    ("preflight (tokenizer, data, checks)", "ray_connected", "preflight"),
    ("MLflow run opened", "preflight", "run_opened"),
    ("trainer start (workers, until the loop runs)", "run_opened", "loop_start"),
    ("model and data load", "loop_start", "built"),
    ("first step", "built", "first_step"),
    ("remaining steps", "first_step", "train_end"),
    ("final evaluation", "train_end", "final_eval"),
    ("final checkpoint saved", "final_eval", "final_saved"),
    ("checkpoint upload + trainer shutdown", "final_saved", "fit_returned"),
    ("registration", "fit_returned", "registered"),
    ("promotion + MLflow run closed", "registered", "done"),
    ("service notices (result record read)", "done", "seen_done"),
)


def phases_of(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase, in order, from one job's marks (phases whose marks are missing are left out)."""
    return {name: marks[b] - marks[a] for name, a, b in PHASES if a in marks and b in marks}


def run_job_through_service(client, spec: dict[str, Any], timeout: float = 600) -> dict[str, float]:
    """Submit `spec`, follow it to the end; returns its marks (submit, the job's own, seen_done)."""
    t_submit = time.time()
    job = client.submit(spec)
    return _marks_when_done(client, job["id"], t_submit, timeout)


def _marks_when_done(client, job_id: str, t_submit: float, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job["state"] == "succeeded":
            seen = time.time()
            result = next((e for e in client.events(job_id) if e["kind"] == "result"), None)
            timings = ((result or {}).get("data") or {}).get("extra", {}).get("timings", {})
            return {"submit": t_submit, **timings, "seen_done": seen}
        if job["state"] in ("failed", "cancelled"):
            raise RuntimeError(f"service job {job_id} {job['state']}: {(job.get('error') or '')[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"service job {job_id} did not end within {timeout:.0f} s")


def sequential(client, spec: dict[str, Any], repeats: int) -> dict[str, Any]:
    """`repeats` jobs one after another: the per-phase seconds of each and their medians."""
    return summarize([run_job_through_service(client, {**spec, "name": f"{spec['name']}-p{i}"})
                      for i in range(repeats)])


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Per-phase medians and submit -> registered / succeeded medians of jobs' marks."""
    per_run = [phases_of(m) for m in runs]
    names = [n for n, _, _ in PHASES if all(n in p for p in per_run)]
    totals = [m["registered"] - m["submit"] for m in runs if "registered" in m]
    return {"phases_s": {n: statistics.median(p[n] for p in per_run) for n in names},
            "submit_to_registered_s": statistics.median(totals) if totals else None,
            "submit_to_succeeded_s": statistics.median(m["seen_done"] - m["submit"] for m in runs),
            "runs": [{"marks": m, "phases_s": p} for m, p in zip(runs, per_run)]}


def concurrent(client, spec: dict[str, Any], n: int, single_s: float | None) -> dict[str, Any]:
    """`n` jobs submitted at once: wall from the first submit to the last registered version, and the overhead
    each extra job adds over one job alone (`single_s`: one job's submit -> registered)."""
    specs = [{**spec, "name": f"{spec['name']}-c{i}"} for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        marks = list(pool.map(lambda s: run_job_through_service(client, s), specs))
    first = min(m["submit"] for m in marks)
    wall = max(m["registered"] for m in marks) - first
    out = {"jobs": n, "wall_first_submit_to_last_registered_s": wall,
           "wall_first_submit_to_last_succeeded_s": max(m["seen_done"] for m in marks) - first,
           "submit_to_registered_s": sorted(m["registered"] - m["submit"] for m in marks),
           "runs": [{"marks": m, "phases_s": phases_of(m)} for m in marks]}
    if single_s is not None and n > 1:
        out["single_job_s"] = single_s
        out["per_extra_job_s"] = (wall - single_s) / (n - 1)
    return out
