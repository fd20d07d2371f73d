"""The wheel built from the checkout holds what peftray needs at run time, and works installed on its own.

It is built from a copy of only what infra/docker/Dockerfile's builder copies (pyproject.toml, README.md,
peftray/), with the same `pip wheel` that `make wheel` runs, and installed into a fresh virtual environment
outside the repository: no editable install, no checkout on the path. From there the quick path runs with the
installed `peftray` command: make the tiny model, start the local stack, train 3 steps, stop the stack.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
WHEEL = f"peftray-{VERSION}-py3-none-any.whl"
# The environment of the test process may point at the session stack or at the checkout; the installed
# wheel must find neither.
DROPPED = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PEFTRAY_", "MLFLOW_", "RAY_", "AWS_")

# A fresh venv resolves and unpacks ~200 packages: minutes on a busy 2-core machine, past the suite's 900 s.
pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(3600)]


def _run(argv: list, *, env: dict | None = None, cwd: Path | None = None, timeout: int = 900) -> str:
    """Run a command; its stdout (stderr goes into the failure message)."""
    out = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, argv))} failed ({out.returncode}):\n{out.stdout[-4000:]}\n" \
                                f"{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "peftray", src / "peftray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    log = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--wheel-dir", dist, src])  # -v: the backend's log
    # setuptools warns here about a deprecated pyproject (e.g. a `project.license` table); the build must not.
    assert not re.search(r"(SetuptoolsDeprecationWarning|BuildBackendWarning)", log), log[-4000:]
    assert [p.name for p in dist.iterdir()] == [WHEEL]
    return dist / WHEEL


def test_wheel_holds_every_package_file_and_the_metadata(wheel):
    tracked = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "peftray"], cwd=ROOT).split()
    assert "peftray/assets/corpus.txt" in tracked
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(f"peftray-{VERSION}.dist-info/METADATA").decode()
        entry_points = zf.read(f"peftray-{VERSION}.dist-info/entry_points.txt").decode()
    assert sorted(set(tracked) - names) == []  # code, assets, everything under peftray/
    assert f"Version: {VERSION}" in meta and "License-Expression: Apache-2.0" in meta
    assert re.search(r"^peftray = peftray\.cli:main$", entry_points, re.M)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("venv")
    assert ROOT not in where.parents
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", where])
    # The versions of the test environment, as constraints: pip resolves the wheel's own requirements (one it
    # forgot is not installed), without the long backtracking over boto3/aiobotocore releases. torch 2.13.0
    # (CPU) comes from the wheel on this machine's disk, the rest from the index or pip's cache.
    frozen = _run([sys.executable, "-m", "pip", "freeze", "--exclude", "peftray"]).splitlines()
    constraints = where / "constraints.txt"
    constraints.write_text("\n".join([*(line for line in frozen if "==" in line and " @ " not in line),
                                      *(ROOT / "constraints-cpu.txt").read_text().splitlines()]) + "\n")
    # --no-compile: pip byte-compiles every installed module by default, ~26,000 here (transformers' 2,912 alone
    # took 87 s on a busy run); Python compiles what the test imports when it imports it.
    _run([where / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check",
          "-c", constraints, wheel],
         env=_env(where), timeout=1800)
    return where


def _env(venv: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED)}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


def _write_job(work: Path, model: Path) -> Path:
    """A 3-step LoRA job on the tiny model, with instruction data written here (not the checkout's jobs/)."""
    rows = [{"prompt": f"Repeat the number {i} =>", "response": f" {i} {i}"} for i in range(24)]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"""name: wheel-smoke
base_model: {{path: {model}}}
adapter: {{method: lora, r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}}
dataset: {{source: {work / 'data.jsonl'}, format: instruction, max_seq_len: 32}}
training: {{max_steps: 3, learning_rate: 1.0e-3, batch_size: 4}}
resources: {{num_workers: 1}}
registry: {{model_name: wheel-smoke}}
"""
    (work / "job.yaml").write_text(spec)
    return work / "job.yaml"


def _stack_up(peftray: list, **kw) -> None:
    """`peftray stack up`, once more if another program took a port it picked (the error says to rerun): on a
    machine shared by several test runs, free ports can be taken between picking and binding."""
    argv = [str(a) for a in [*peftray, "stack", "up", "--num-cpus", "2"]]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    if first.returncode != 0 and "run `peftray stack up` again" in first.stdout + first.stderr:
        _run(argv, timeout=600, **kw)
    else:
        assert first.returncode == 0, f"stack up failed:\n{first.stdout[-4000:]}\n{first.stderr[-4000:]}"


def test_installed_wheel_makes_a_model_runs_the_stack_and_trains(venv, tmp_path):
    work = tmp_path / "work"  # the working directory: outside the repository, so is the state folder in it
    work.mkdir()
    env = _env(venv, PEFTRAY_CACHE_DIR=str(work / "cache"), HOME=str(work))
    where = _run([venv / "bin" / "python", "-c", "import importlib.metadata as m, peftray; "
                  "print(peftray.__file__); print(m.version('peftray'))"], env=env, cwd=work).split()
    assert Path(where[0]).is_relative_to(venv) and where[1] == VERSION, where  # the wheel's code, not the checkout's
    peftray = [venv / "bin" / "peftray", "--state-dir", work / "state"]

    _run([*peftray, "make-tiny-model", work / "tiny"], env=env, cwd=work)
    assert (work / "tiny" / "config.json").exists()
    job = _write_job(work, work / "tiny")
    try:
        _stack_up(peftray, env=env, cwd=work)
        out = _run([*peftray, "train", "--json", job], env=env, cwd=work, timeout=1200)
    finally:
        _run([*peftray, "stack", "down"], env=env, cwd=work, timeout=300)
    # --json prints the result last, indented, so it starts at the last line that is just "{".
    result = json.loads(out[[m.start() for m in re.finditer(r"^\{$", out, re.M)][-1]:])
    assert result["model_name"] == "wheel-smoke" and result["version"] >= 1, result
    assert result["metrics"]["step"] == 3 and result["adapter_uri"], result
