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

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(1800)]


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
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", where])
    site = Path(_run([where / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     env=_env(where)).strip())
    # Only what the wheel's own metadata asks for, and what that asks for in turn, is linked in: a requirement
    # the wheel forgot is missing here, as in a user's install.
    linked = _link_requirements(wheel, site, where / "bin")
    assert {"torch", "ray", "mlflow", "transformers"} <= linked, sorted(linked)
    # The wheel itself is installed by pip, as a user would, without dependencies (they are linked above);
    # `pip check` then verifies every requirement of every installed distribution against the linked versions.
    _run([sys.executable, "-m", "pip", "--python", where / "bin" / "python", "install", "--quiet", "--no-deps",
          "--no-compile", "--disable-pip-version-check", wheel], env=_env(where), timeout=600)
    _run([sys.executable, "-m", "pip", "--python", where / "bin" / "python", "check"], env=_env(where))
    return where


def _link_requirements(wheel: Path, site: Path, bin_dir: Path) -> set[str]:
    """Make the wheel's requirements (the transitive closure, extras included) importable in a fresh venv by
    linking the test environment's installed files into it, instead of downloading and unpacking ~200
    distributions again (20 minutes on a busy 2-core machine for the same bytes). Package folders are linked
    whole when one distribution owns them, file by file otherwise (namespace folders); console scripts are
    written anew for the venv's own Python (the test environment's start the checkout's interpreter); other
    programs (SeaweedFS's `weed`) are linked. Returns the canonical names of the linked distributions."""
    import importlib.metadata as md
    from email.parser import Parser

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    installed = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}
    with zipfile.ZipFile(wheel) as zf:
        meta = Parser().parsestr(zf.read(f"peftray-{VERSION}.dist-info/METADATA").decode())
    todo = [(Requirement(r), "") for r in meta.get_all("Requires-Dist") or []]
    wanted: dict[str, set[str]] = {}
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        assert name in installed, f"the wheel requires {req}, which the test environment lacks"
        assert req.specifier.contains(installed[name].version, prereleases=True), f"{req}: the test environment has {installed[name].version}"
        extras = set(req.extras)
        if name in wanted and extras <= wanted[name]:
            continue
        first = name not in wanted
        wanted[name] = wanted.get(name, set()) | extras
        for r in installed[name].requires or []:
            for e in ([""] if first else []) + sorted(extras):
                todo.append((Requirement(r), e))

    owners: dict[str, set[str]] = {}  # top-level entry of site-packages -> the distributions with files in it
    for name, dist in installed.items():
        for f in dist.files or []:
            if not str(f).startswith(".."):
                owners.setdefault(f.parts[0], set()).add(name)
    for name in sorted(wanted):
        dist = installed[name]
        scripts = {ep.name: ep.value for ep in dist.entry_points.select(group="console_scripts")}
        for f in dist.files or []:
            src = Path(dist.locate_file(f)).resolve()
            if str(f).startswith(".."):
                if f.parent.name != "bin" or not src.is_file():
                    continue  # data files outside site-packages (headers, man pages)
                target = bin_dir / f.name
                if f.name in scripts:
                    module, _, attr = scripts[f.name].partition(":")
                    target.write_text(f"#!{bin_dir / 'python'}\nimport sys\nfrom {module} import "
                                      f"{attr.split('.')[0]}\nsys.exit({attr}())\n")
                    target.chmod(0o755)
                elif not target.exists():
                    target.symlink_to(src)
                continue
            top = f.parts[0]
            if top == "__pycache__" or "__pycache__" in f.parts:
                continue
            whole = owners[top] == {name}
            target = site / (top if whole else f)
            if target.is_symlink() or target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path(dist.locate_file(top)).resolve() if whole else src)
    return set(wanted)


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
