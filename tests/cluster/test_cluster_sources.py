"""Every path past the local stack installs peftray from this checkout: no file installs it by name from a
package index, the image installs the wheel it builds from the build context, and `make` tags it with
pyproject's version."""

from __future__ import annotations

import fnmatch
import re
import subprocess

import pytest

from cluster_checks import ROOT, index_install_problems, project_version, wheel_name

DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
NAME = "peftray"  # broken examples below are built from this, so this file holds no index install itself


def _repo_files() -> list:
    """Tracked and new (not ignored) files: what a fresh clone, and a commit of this tree, holds."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in out.stdout.split("\0") if name and (ROOT / name).is_file()]


def _text(path) -> str | None:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return None  # binary (a PNG, a wheel): installs nothing


def test_no_file_installs_peftray_from_an_index():
    files = _repo_files()
    assert any(f.name == "Dockerfile" for f in files) and any(f.suffix == ".md" for f in files)
    problems = [p for f in files if (text := _text(f)) is not None
                for p in index_install_problems(text, str(f.relative_to(ROOT)))]
    assert problems == []


@pytest.mark.parametrize("text", [
    f'RUN pip install --no-cache-dir "{NAME}[postgres]==${{PEFTRAY_VERSION}}"',
    f"  - pip install -q {NAME}",
    f"RUN pip install \\\n    '{NAME}[postgres,quant]'",
    f"needs bitsandbytes (pip install '{NAME}[quant]').",
    f"uv pip install {NAME}>=0.1",
    f"dependencies = ['{NAME}==0.1.0']",
])
def test_index_install_check_catches(text):
    assert index_install_problems(text, "x")


@pytest.mark.parametrize("text", [
    "pip install -q \"/home/ubuntu/peftray-dist/peftray-0.1.0-py3-none-any.whl[postgres]\"",
    "pip install -e '.[test]'",
    'pip install --no-cache-dir "${wheel}[postgres]"',
    "pip install openai  # peftray's test extra has it",
])
def test_index_install_check_passes_wheels_and_checkouts(text):
    assert index_install_problems(text, "x") == []


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped), one list per stage."""
    lines = re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines()
    stages: list[list[str]] = []
    for line in (s.strip() for s in lines):
        if line.startswith("FROM "):
            stages.append([])
        if line and not line.startswith("#") and stages:
            stages[-1].append(line)
    return stages


def test_image_installs_the_wheel_it_builds_from_the_build_context():
    build, final = _stages()[0], _stages()[-1]
    assert len(_stages()) == 2 and re.fullmatch(r"FROM \S+ AS (\w+)", build[0])
    stage = build[0].split()[-1]
    copied = {part for line in build if line.startswith("COPY ") for part in line.split()[1:-1]}
    assert {"pyproject.toml", "README.md", "peftray"} <= copied, "the builder copies the package from the context"
    assert any(re.search(r"pip wheel .*--wheel-dir (\S+) \.$", line) for line in build if line.startswith("RUN"))
    # The final stage copies exactly that wheel (at pyproject's version, through PEFTRAY_VERSION)...
    (copy,) = [line for line in final if line.startswith("COPY ")]
    assert f"--from={stage}" in copy and copy.split()[-2].endswith(wheel_name("${PEFTRAY_VERSION}"))
    assert f"ARG PEFTRAY_VERSION={project_version()}" in final
    # ... and every pip install there installs that file first, with extras only.
    installs = [m.group(1) for line in final for m in re.finditer(r"pip install ([^;]*)", line)]
    wheel_var = re.search(r"(\w+)=\S*" + re.escape(wheel_name("${PEFTRAY_VERSION}")), " ".join(final)).group(1)
    assert len(installs) == 3 and all(
        re.match(rf'--no-cache-dir "\$\{{{wheel_var}\}}(\[[\w,]+\])?"', args) for args in installs), installs


def test_build_context_holds_what_the_dockerfile_copies():
    """.dockerignore keeps the context small (no .venv, .git, models) but must not drop what is copied."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def kept(path: str) -> bool:
        keep = True
        for pat in patterns:
            negate, pat = pat.startswith("!"), pat.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
                keep = negate
        return keep

    assert all(kept(p) for p in ("pyproject.toml", "README.md", "peftray/__init__.py", "peftray/assets/corpus.txt"))
    assert not any(kept(p) for p in (".venv/bin/python", ".git/HEAD", "dist/x.whl", "models/tiny/config.json"))


@pytest.mark.parametrize("variant,suffix", [("cpu", ""), ("gpu", "-gpu"), ("tpu", "-tpu")])
def test_make_names_wheel_and_image_with_pyproject_version(variant, suffix):
    version = project_version()
    out = subprocess.run(["make", "-n", "-B", "wheel", "image", "push", f"VARIANT={variant}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert f"--build-arg VARIANT={variant} --build-arg PEFTRAY_VERSION={version}" in out
    assert f"-t ghcr.io/peftray/peftray:{version}{suffix} ." in out
    assert f"docker push ghcr.io/peftray/peftray:{version}{suffix}" in out
    assert "pip wheel" in out and "--wheel-dir dist ." in out
