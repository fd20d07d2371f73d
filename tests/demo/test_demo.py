"""The main job end to end (`peftray demo`'s code path) on the session stack: two adapters trained through the
control plane, registered, one promoted through a gate and a worse one refused, all served side by side."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
UNIFORM_LOSS = math.log(512)  # the tiny model's vocabulary


@pytest.fixture(scope="module")
def demo(stack, tiny_model):
    from peftray.demo import DemoOptions, run
    from peftray.serve import down as serve_down
    from peftray.stack import control_plane

    lines: list[str] = []
    opts = DemoOptions(state_dir=stack.state_dir, repo_dir=ROOT, model_dir=tiny_model,
                       out=lambda m: (lines.append(m), print(m)))
    saved = dict(os.environ)  # the demo exports its control plane's URL and token, as the CLI would
    try:
        yield run(opts), lines
    finally:
        try:
            serve_down("demo", stack)
        except Exception:  # noqa: BLE001 - the app is absent when the demo failed before serving
            pass
        control_plane.down(stack.state_dir)
        os.environ.clear()
        os.environ.update(saved)


def test_both_jobs_train_and_register(demo, stack):
    from peftray import registry

    res, _ = demo
    assert set(res.jobs) == {"demo-polite", "demo-counting"}
    for name, job in res.jobs.items():
        assert job["state"] == "succeeded", job
        assert [t["state"] for t in job["transitions"]] == ["queued", "starting", "running", "succeeded"]
        v = registry.resolve(f"{job['model_name']}/{job['model_version']}", stack)
        assert v.run_id == job["mlflow_run_id"] and v.tags["team"] == "demo" and v.method == "lora"
        assert job["metrics"]["eval_loss"] < UNIFORM_LOSS / 2, job["metrics"]  # far better than a uniform guess
    assert res.plot and res.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res.plot.stat().st_size > 10_000


def test_production_holds_the_gated_version_and_the_worse_one_is_refused(demo, stack):
    from peftray import registry

    res, lines = demo
    good = res.jobs["demo-polite"]
    held = registry.resolve("demo-polite@production", stack)
    assert held.version == int(good["model_version"])
    assert "eval_loss" in res.refused and "refused" in "\n".join(lines)
    # the refused candidate exists as a version, but production did not move to it
    assert max(v.version for v in registry.list_versions("demo-polite", stack)) > held.version


def test_answers_show_what_each_adapter_learned(demo):
    res, lines = demo
    polite, counting = res.answers["demo-polite@production"], res.answers["demo-counting@latest"]
    base = res.answers["tiny-llama"]
    assert all("thank you" in a.lower() for a in polite), polite
    assert all("one two three" in a for a in counting), counting
    assert not any("thank you" in a.lower() or "one two three" in a for a in base), base
    table = "\n".join(lines)
    assert polite[0] in table and counting[0] in table


def test_where_next_names_the_urls(demo, stack):
    res, _ = demo
    assert res.urls["MLflow UI (runs, registered models)"] == stack.mlflow_tracking_uri
    assert res.urls["Ray dashboard"] == stack.ray_dashboard_url
    assert res.urls["serving (OpenAI API)"] == f"{res.serve_url}/v1" and res.serve_url.endswith("/demo")


def test_cli_refuses_a_folder_without_the_demo_jobs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "peftray", "--state-dir", str(tmp_path / "s"), "demo",
                           "--repo-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "has no demo jobs" in done.stdout + done.stderr
    assert not (tmp_path / "s" / "stack.json").exists()  # nothing was started
