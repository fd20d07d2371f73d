"""The demo's steps, each through the same public API a user would call (stack, control plane, registry, serve)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from peftray.endpoints import Config, load_config
from peftray.errors import GateError, PeftrayError

QUESTIONS = ("Tell me about the river.\n", "Describe a quiet student.\n")

# The gate of the first promotion: the adapter must beat a uniform guess over the tiny model's vocabulary.
UNIFORM_LOSS = math.log(512)


def start_stack(opts) -> Config:
    from peftray import stack
    from peftray.stack import control_plane

    stack.up(stack.Options(state_dir=opts.state_dir), progress=lambda m: opts.out(f"      {m}"))
    # the OpenAI fine-tuning API offers the tiny model (written in step 2) as `model="tiny-llama"`
    model = Path(opts.model_dir or opts.repo_dir / "models" / "tiny-llama").absolute()
    svc = control_plane.up(opts.state_dir, {"PEFTRAY_SERVICE_BASE_MODELS": f"tiny-llama={model}"})
    opts.out(f"      control plane at {svc.url}")
    return load_config(opts.state_dir)


def make_model(opts) -> Path:
    from peftray.base_models import make_tiny_llama

    path = make_tiny_llama(opts.model_dir or opts.repo_dir / "models" / "tiny-llama")
    opts.out(f"      {path}")
    return path


def _load(opts, job: str, model_dir: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    from peftray.jobspec import load_spec

    overrides = [f"base_model.path={model_dir}",
                 f"dataset.source={(opts.repo_dir / 'jobs' / 'data' / (job.replace('-', '_') + '.jsonl')).absolute()}"]
    if opts.max_steps:
        overrides.append(f"training.max_steps={opts.max_steps}")
    return load_spec(opts.repo_dir / "jobs" / f"{job}.yaml", [*overrides, *extra]).model_dump(mode="json")


def _client(cfg: Config):
    from peftray.service.client import ServiceClient

    return ServiceClient.from_config(cfg)


def follow(client, job_ids: dict[str, str], timeout: float = 1800) -> dict[str, dict[str, Any]]:
    """One progress bar per job (step, loss, tokens/s), polled from the control plane until all jobs end.

    On a terminal the bars redraw in place; into a log file or pipe they print a line every 10 s instead.
    """
    import sys

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    bars = {name: tqdm(total=None, desc=f"      {name:<17}", unit="step", position=i, leave=True,
                       dynamic_ncols=True, mininterval=0.5 if tty else 10.0)
            for i, name in enumerate(job_ids)}
    final: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(final) < len(job_ids):
            for name, jid in job_ids.items():
                if name in final:
                    continue
                job = client.get(jid)
                _update(bars[name], job)
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    final[name] = job
            if time.monotonic() > deadline:
                raise PeftrayError(f"jobs still running after {timeout:.0f}s: {sorted(set(job_ids) - set(final))}")
            time.sleep(1.0)
    finally:
        for bar in bars.values():
            bar.close()
    return final


def _update(bar, job: dict[str, Any]) -> None:
    prog = job.get("progress") or {}
    if prog.get("total_steps") and bar.total != prog["total_steps"]:
        bar.total = prog["total_steps"]
    step = prog.get("step")
    if isinstance(step, int) and step > bar.n:
        bar.update(step - bar.n)
    post = {k: f"{prog[k]:.3g}" for k in ("loss", "tokens_per_s") if isinstance(prog.get(k), (int, float))}
    bar.set_postfix({"state": job["state"], **post}, refresh=False)


def train(opts, cfg: Config, model_dir: Path) -> dict[str, dict[str, Any]]:
    with _client(cfg) as client:
        ids = {}
        for job in ("demo-polite", "demo-counting"):
            record = client.submit(_load(opts, job, model_dir), idempotency_key=None)
            ids[job] = record["id"]
            opts.out(f"      submitted {job}: job {record['id']}")
        final = follow(client, ids)
    for name, job in final.items():
        if job["state"] != "succeeded":
            raise PeftrayError(f"job {name} ({job['id']}) ended {job['state']}: {job.get('reason') or ''} "
                               f"{job.get('error') or ''}".strip())
        metrics = job.get("metrics") or {}
        opts.out(f"      {name}: {job['model_name']} version {job['model_version']}, "
                 f"eval_loss {metrics.get('eval_loss', float('nan')):.3f} (MLflow run {job['mlflow_run_id']})")
    return final


def plot(opts, cfg: Config, jobs: dict[str, dict[str, Any]]) -> Path | None:
    from peftray.demo.plot import plot_losses

    runs = {name: job["mlflow_run_id"] for name, job in jobs.items() if job.get("mlflow_run_id")}
    return plot_losses(runs, opts.state_dir / "demo" / "loss_curves.png", cfg)


def promote(opts, cfg: Config, model_dir: Path, good: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Promote the trained version behind a threshold gate; then train a worse one and watch the gate refuse it."""
    name, version = good["model_name"], int(good["model_version"])
    with _client(cfg) as client:
        gate = {"metric": "eval_loss", "mode": "min", "threshold": UNIFORM_LOSS}
        record = client.promote(name, version, "production", reason="demo: beats a uniform guess", gate=gate)
        opts.out(f"      {name}@production -> version {version} (gate: eval_loss <= ln(512) = {UNIFORM_LOSS:.2f})")
        short = client.submit(_load(opts, "demo-polite", model_dir, ("name=demo-polite-short", "training.max_steps=3")))
        opts.out(f"      trained a worse candidate (3 steps): job {short['id']}")
        worse = follow(client, {"demo-polite-short": short["id"]})["demo-polite-short"]
        if worse["state"] != "succeeded":
            raise PeftrayError(f"the short job ended {worse['state']}: {worse.get('error') or ''}")
        gate = {"metric": "eval_loss", "mode": "min", "no_worse_than_current": True}
        try:
            client.promote(name, int(worse["model_version"]), "production", reason="demo: worse candidate", gate=gate)
        except (GateError, PeftrayError) as exc:
            refused = str(exc)
        else:
            raise PeftrayError(f"the gate let version {worse['model_version']} (3 training steps) take production")
        opts.out(f"      refused, as it should be: {refused}")
    return record, refused


ASKED = ("tiny-llama", "demo-polite@production", "demo-counting@latest")


def serve_and_ask(opts, cfg: Config, model_dir: Path) -> tuple[dict[str, list[str]], str]:
    """Deploy jobs/serve-demo.yaml, then ask every model every question at once (they share forward passes)."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from peftray.serve import deploy, load_serve_config

    spec = load_serve_config(opts.repo_dir / "jobs" / "serve-demo.yaml", {"base_model": str(model_dir)})
    dep = deploy(spec, cfg)
    opts.out(f"      serving at {dep.url}/v1 (OpenAI API)")
    client = OpenAI(base_url=f"{dep.url}/v1", api_key=dep.api_key, max_retries=2, timeout=120)

    def ask(pair: tuple[str, str]) -> str:
        model, question = pair
        done = client.completions.create(model=model, prompt=question, max_tokens=24, temperature=0)
        return done.choices[0].text.strip()

    pairs = [(m, q) for m in ASKED for q in QUESTIONS]
    with ThreadPoolExecutor(len(pairs)) as pool:
        texts = list(pool.map(ask, pairs))
    answers = {m: texts[i * len(QUESTIONS):(i + 1) * len(QUESTIONS)] for i, m in enumerate(ASKED)}
    _print_side_by_side(opts, answers)
    return answers, dep.url


def _print_side_by_side(opts, answers: dict[str, list[str]]) -> None:
    from peftray.tables import table

    rows = [(q.strip(), *(answers[m][i] for m in ASKED)) for i, q in enumerate(QUESTIONS)]
    for line in table(["question", *ASKED], rows).splitlines():
        opts.out(f"      {line}")


def where_next(opts, cfg: Config, serve_url: str | None = None) -> dict[str, str]:
    urls = {"MLflow UI (runs, registered models)": cfg.mlflow_tracking_uri or "",
            "Ray dashboard": cfg.ray_dashboard_url or "",
            "control plane API": f"{cfg.service_url}/docs" if cfg.service_url else "",
            "serving (OpenAI API)": f"{serve_url}/v1" if serve_url else ""}
    for label, url in urls.items():
        if url:
            opts.out(f"      {label:<38} {url}")
    opts.out(f"      MLflow login: user {cfg.mlflow_username}, password in {cfg.state_dir / 'stack.json'}")
    opts.out(f"      Ray dashboard token: {cfg.ray_auth_token_path}")
    opts.out("      stop everything:  .venv/bin/peftray stack down")
    return urls
