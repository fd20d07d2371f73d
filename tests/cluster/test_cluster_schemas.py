"""`kubectl kustomize` renders infra/k8s and cluster/kuberay, every object validates against its schema, and the
peftray image is named in one place per kustomization."""

from __future__ import annotations

import copy
import shutil

import pytest
import yaml

from cluster_checks import PEFTRAY_IMAGE, ROOT, containers, project_version
from k8s_schemas import kustomize, schema_problems

KUSTOMIZATIONS = [ROOT / "infra" / "k8s", ROOT / "cluster" / "kuberay"]
COMPONENTS = {"raycluster": {"RayCluster"}, "rayjob": {"ConfigMap", "RayJob"}, "rayservice": {"RayService"}}


@pytest.fixture(scope="module")
def rendered() -> dict:
    return {d.name: kustomize(d) for d in KUSTOMIZATIONS}


@pytest.mark.parametrize("name", [d.name for d in KUSTOMIZATIONS])
def test_renders_and_validates(rendered, name):
    docs = rendered[name]
    assert docs
    assert [p for d in docs for p in schema_problems(d)] == []
    assert {d["metadata"].get("namespace") for d in docs} == {"peftray"}, "one namespace with the secrets"


def test_kuberay_manifests_are_all_rendered_and_split_by_component(rendered):
    docs = rendered["kuberay"]
    assert {d["kind"] for d in docs} >= {"RayCluster", "RayJob", "RayService"}
    # `kubectl apply -k cluster/kuberay -l app.kubernetes.io/component=X` applies exactly one use.
    by_component: dict[str, set[str]] = {}
    for d in docs:
        component = d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        by_component.setdefault(component, set()).add(d["kind"])
    assert by_component == COMPONENTS


def _bad_copies(docs: list[dict]) -> list[dict]:
    """Broken variants of rendered objects: an unknown CRD field, a wrong type, a typo in a pod template, a
    wrong type in a core Kubernetes object."""
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["rayStartParam"] = {}
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    in_pod = copy.deepcopy(next(d for d in docs if d["kind"] == "RayService"))
    in_pod["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imag"] = "x"
    return [typo, wrong_type, in_pod]


def test_schema_checks_catch_broken_objects(rendered):
    for bad in _bad_copies(rendered["kuberay"]):
        assert schema_problems(bad), bad["kind"]
    deployment = copy.deepcopy(next(d for d in rendered["k8s"] if d["kind"] == "Deployment"))
    deployment["spec"]["replicas"] = "one"
    assert schema_problems(deployment)


@pytest.mark.parametrize("name", [d.name for d in KUSTOMIZATIONS])
def test_image_override_names_every_peftray_container(rendered, name, tmp_path):
    """The kustomization's `images` entry is the one place that names the registry; tags stay the version."""
    version = project_version()
    images = {c["image"] for d in rendered[name] for c in containers(d) if c["image"].startswith(PEFTRAY_IMAGE)}
    assert images and all(i.rsplit(":", 1)[1].split("-")[0] == version for i in images)
    copy_dir = tmp_path / name
    shutil.copytree(ROOT / ("infra/k8s" if name == "k8s" else "cluster/kuberay"), copy_dir)
    kustomization = yaml.safe_load((copy_dir / "kustomization.yaml").read_text())
    (entry,) = [i for i in kustomization["images"] if i["name"] == PEFTRAY_IMAGE]
    entry["newName"] = "registry.example.com/team/peftray"
    (copy_dir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    moved = {c["image"] for d in kustomize(copy_dir) for c in containers(d)
             if "peftray" in c["image"].rsplit("/", 1)[-1]}
    assert moved == {i.replace(PEFTRAY_IMAGE, "registry.example.com/team/peftray") for i in images}
