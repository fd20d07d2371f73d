"""Regenerate kuberay-*.json from KubeRay's CRDs: `python trim_kuberay_crds.py KUBERAY_CHECKOUT` (vendored: v1.7.0).

The CRDs (ray-operator/config/crd/bases/ray.io_*.yaml, Apache-2.0) are 1-1.4 MB each because every pod template
and Service is inlined. We keep the v1 openAPIV3Schema without descriptions and replace each inlined Kubernetes
type by a marker naming it; the tests validate those parts against the Kubernetes schemas that
kubernetes-validate ships, so nothing is checked less, and the vendored files stay small.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

KINDS = {"rayclusters": "RayCluster", "rayjobs": "RayJob", "rayservices": "RayService"}


def k8s_type(schema: dict) -> str | None:
    """The Kubernetes type an inlined subschema is, told by its fields."""
    props = schema.get("properties", {})
    spec = props.get("spec", {}).get("properties", {})
    if "metadata" in props and "containers" in spec:
        return "PodTemplateSpec"
    if "metadata" in props and "ports" in spec and "selector" in spec and "clusterIP" in spec:
        return "Service"
    return None


def trim(schema: dict) -> dict:
    kind = k8s_type(schema)
    if kind:
        return {"type": "object", "x-peftray-k8s-type": kind}
    out = {k: v for k, v in schema.items() if k != "description"}
    if "properties" in out:
        out["properties"] = {name: trim(s) for name, s in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = trim(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [trim(s) for s in out[key]]
    return out


def main(checkout: Path) -> None:
    here = Path(__file__).parent
    for plural, kind in KINDS.items():
        crd = yaml.safe_load((checkout / f"ray-operator/config/crd/bases/ray.io_{plural}.yaml").read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = trim(version["schema"]["openAPIV3Schema"])
        (here / f"kuberay-{kind.lower()}-v1.json").write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
