"""Render the kustomizations with `kubectl kustomize` and validate every object against its schema.

Kubernetes kinds: the strict JSON schemas kubernetes-validate ships (unknown fields are errors, as with
`kubectl apply --validate=strict`). KubeRay kinds: the CRDs' own openAPIV3Schema, vendored small in schemas/
(see trim_kuberay_crds.py), made strict the same way; the pod templates and Services they inline are checked
with the Kubernetes schemas, through the v1 kinds that carry them (PodTemplate, Service).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import yaml

SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = kubernetes_validate.latest_version()
MARKER = "x-peftray-k8s-type"


def kustomize(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize DIR` renders (what `kubectl apply -k DIR` would send)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the kustomizations (Debian: apt-get install kubernetes-client)"
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def strict(schema: Any) -> Any:
    """A CRD schema with unknown fields rejected, as the API server's strict field validation does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict) or MARKER in schema:
        return schema
    out = {k: strict(v) if k not in ("enum", "required") else v for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "properties" in schema:
        out["properties"] = {name: strict(s) for name, s in schema["properties"].items()}
    return out


@cache
def crd_schema(kind: str) -> dict:
    return strict(json.loads((SCHEMAS / f"kuberay-{kind.lower()}-v1.json").read_text()))


def embedded(schema: dict, doc: Any, path: str = "") -> Iterator[tuple[str, str, dict]]:
    """(path, Kubernetes type, value) for every inlined pod template / Service in a KubeRay object."""
    if MARKER in schema:
        yield path, schema[MARKER], doc
    elif isinstance(doc, dict):
        for name, value in doc.items():
            sub = schema.get("properties", {}).get(name)
            if sub:
                yield from embedded(sub, value, f"{path}.{name}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(doc):
            yield from embedded(schema["items"], value, f"{path}[{i}]")


def k8s_problems(doc: dict, where: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
        return [f"{where}: {exc}"]
    return []


def schema_problems(doc: dict) -> list[str]:
    """Everything wrong with one rendered object, as `where: what` lines (empty when it validates)."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion") != "ray.io/v1":
        return k8s_problems(doc, where)
    schema = crd_schema(doc["kind"])
    problems = [f"{where}.{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    problems += k8s_problems({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, where)
    for path, kind, value in embedded(schema, doc):
        wrapped = ({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": value}
                   if kind == "PodTemplateSpec" else {"apiVersion": "v1", "kind": kind, **value})
        problems += k8s_problems(wrapped, f"{where}{path}")
    return problems
