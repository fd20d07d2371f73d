"""Checks shared by the cluster/infra tests: what a manifest must carry, as functions that return problems.

Each check returns a list of human-readable problems (empty = fine), so the tests can also feed them a
broken document and prove the check notices.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[2]
SECRETISH = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|PRIVATE)", re.I)
PEFTRAY_IMAGE = "ghcr.io/peftray/peftray"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
# GKE's TPU accelerator node label -> Ray's accelerator_type name for the same chip.
GKE_TPU_TO_RAY = {"tpu-v6e-slice": "TPU-V6E", "tpu-v5p-slice": "TPU-V5P",
                  "tpu-v5-lite-podslice": "TPU-V5LITEPOD", "tpu-v4-podslice": "TPU-V4"}


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def walk(node: Any) -> Iterator[dict]:
    """Every mapping inside a parsed YAML document, depth first."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def containers(doc: dict) -> list[dict]:
    return [c for m in walk(doc) for key in ("containers", "initContainers") for c in m.get(key, []) or []
            if isinstance(c, dict) and "image" in c]


def ray_cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    spec = doc.get("spec", {})
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[doc["kind"]] or {}


def inline_secret_problems(doc: Any, where: str) -> list[str]:
    """Secret-looking env values written inline, or Secret objects with data, instead of references."""
    problems = []
    if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append(f"{where}: a Secret with data is committed; create it with kubectl instead")
    for m in walk(doc):
        name = m.get("name")
        if isinstance(name, str) and "value" in m and SECRETISH.search(name):
            problems.append(f"{where}: env {name} has an inline value; use valueFrom.secretKeyRef or envFrom")
        for key in ("redisPassword", "password"):
            val = m.get(key)
            if isinstance(val, str) and val:
                problems.append(f"{where}: {key} is inline; use valueFrom.secretKeyRef")
    return problems


def text_secret_problems(text: str, where: str) -> list[str]:
    """Credentials that look real anywhere in a file's text (AWS keys, private keys, long hex tokens)."""
    patterns = {"AWS access key id": r"AKIA[0-9A-Z]{16}", "private key": r"BEGIN [A-Z ]*PRIVATE KEY",
                "hex token": r"(?<![0-9a-f])[0-9a-f]{40,}(?![0-9a-f])"}
    return [f"{where}: looks like a committed {what}" for what, pat in patterns.items() if re.search(pat, text)]


def compose_image(image: str) -> str:
    """A compose `image:` with its `${VAR:-default}` parts at their defaults (what `up` uses with no .env)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", image)


def image_problems(image: str, version: str, where: str) -> list[str]:
    repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    if not tag or tag == "latest":
        return [f"{where}: image {image} must be pinned to a tag"]
    if repo == PEFTRAY_IMAGE and not re.fullmatch(rf"{re.escape(version)}(-(gpu|tpu))?", tag):
        return [f"{where}: image {image} does not match pyproject version {version}"]
    return []


def wheel_name(version: str) -> str:
    return f"peftray-{version}-py3-none-any.whl"


# `pip install ARGS` up to the end of the shell command; backslash-newlines are joined first.
PIP_INSTALL = re.compile(r"\b(?:uv )?pip3? install\b(?P<args>[^\n;&|`)]*)")
BY_NAME = re.compile(r"peftray(\[[^\]]*\])?([<>=!~]=?\S*)?")
PIN = re.compile(r"\bpeftray(\[[\w,]+\])?\s*(==|>=|~=)")


def index_install_problems(text: str, where: str) -> list[str]:
    """Places that install peftray by name (from a package index) instead of the wheel built from the checkout:
    a pip install of the bare name (with or without extras and a version), and any requirement on the name
    with a version (`==`, `>=`, `~=`)."""
    text = re.sub(r"\\\n", " ", text)
    problems = [f"{where}: requirement `{m.group(0)}` installs peftray from an index" for m in PIN.finditer(text)]
    for m in PIP_INSTALL.finditer(text):
        for token in m.group("args").split():
            if BY_NAME.fullmatch(token.strip("'\"`.,:;()")):
                problems.append(f"{where}: `pip install {token}` installs peftray from an index; install the wheel "
                                "that `make wheel` builds from the checkout")
    return problems


def wheel_version_problems(text: str, version: str, where: str) -> list[str]:
    """Every peftray wheel file named in a file must be pyproject's version."""
    found = re.findall(r"peftray-([0-9][0-9A-Za-z.+]*)-py3-none-any\.whl", text)
    return [f"{where}: names the wheel of peftray {v}, pyproject says {version}" for v in found if v != version]


def resources_of(group: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in containers(group):
        for kind in ("requests", "limits"):
            out.update({k: str(v) for k, v in (c.get("resources", {}).get(kind) or {}).items()})
    return out


def tpu_group_problems(group: dict, where: str) -> list[str]:
    """A TPU worker group must select a slice (accelerator + topology) whose shape Ray agrees with."""
    from ray.util.tpu import get_tpu_worker_resources

    sel = group["template"]["spec"].get("nodeSelector", {})
    accel, topo = sel.get("cloud.google.com/gke-tpu-accelerator"), sel.get("cloud.google.com/gke-tpu-topology")
    if not accel or not topo:
        return [f"{where}: TPU group needs gke-tpu-accelerator and gke-tpu-topology node selectors"]
    if accel not in GKE_TPU_TO_RAY:
        return [f"{where}: unknown TPU accelerator {accel!r}"]
    hosts, per_worker = get_tpu_worker_resources(topology=topo, accelerator_type=GKE_TPU_TO_RAY[accel])
    chips = int(resources_of(group).get("google.com/tpu", 0))
    problems = []
    if group.get("numOfHosts", 1) != hosts:
        problems.append(f"{where}: a {accel} {topo} slice has {hosts} hosts, numOfHosts={group.get('numOfHosts', 1)}")
    if chips != per_worker["TPU"]:
        problems.append(f"{where}: each {topo} host has {per_worker['TPU']:g} chips, google.com/tpu={chips}")
    return problems
