"""KubeRay manifests, infra/ Kubernetes manifests, the compose file and the Dockerfile: what they must carry."""

from __future__ import annotations

import inspect
import re
import shlex

import pytest
import ray
import yaml

from peftray.serve.serve_spec import load_serve_config

from cluster_checks import (
    PEFTRAY_IMAGE, RAY_KINDS, ROOT, compose_image, containers, image_problems, index_install_problems,
    inline_secret_problems, load_docs, project_version, ray_cluster_spec, resources_of, text_secret_problems,
    tpu_group_problems, walk, wheel_version_problems,
)

# The manifests; each folder's kustomization.yaml is checked by rendering it (test_cluster_schemas.py).
KUBERAY = sorted(p for p in (ROOT / "cluster" / "kuberay").glob("*.yaml") if p.name != "kustomization.yaml")
INFRA_K8S = sorted(p for p in (ROOT / "infra" / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
COMPOSE = ROOT / "infra" / "docker-compose.yaml"
ALL_MANIFESTS = KUBERAY + INFRA_K8S + [COMPOSE]
VERSION = project_version()


def _ray_docs() -> list[dict]:
    return [d for p in KUBERAY for d in load_docs(p) if d.get("kind") in RAY_KINDS]


def _one(kind: str) -> dict:
    docs = [d for d in _ray_docs() if d["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind}, found {len(docs)}"
    return docs[0]


def test_kuberay_kinds_and_api_version():
    docs = _ray_docs()
    assert {d["kind"] for d in docs} == RAY_KINDS
    for d in docs:
        assert d["apiVersion"] == "ray.io/v1", d["metadata"]["name"]


@pytest.mark.parametrize("kind", sorted(RAY_KINDS))
def test_cluster_spec_has_what_kuberay_needs(kind):
    spec = ray_cluster_spec(_one(kind))
    assert spec["rayVersion"] == ray.__version__, "rayVersion must be the Ray the images ship"
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "the dashboard must not get a public service"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert containers(head["template"]), "head needs a container"
    assert spec["workerGroupSpecs"], "at least one worker group"
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and containers(g["template"])
        assert g.get("minReplicas", 0) <= g.get("replicas", 0) <= g["maxReplicas"]


def test_raycluster_has_gpu_and_tpu_groups():
    spec = ray_cluster_spec(_one("RayCluster"))
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    groups = spec["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in resources_of(g)]
    tpu = [g for g in groups if "google.com/tpu" in resources_of(g)]
    assert gpu and tpu
    for g in tpu:
        assert tpu_group_problems(g, g["groupName"]) == []


def test_tpu_check_catches_a_wrong_slice_shape():
    group = next(g for g in ray_cluster_spec(_one("RayCluster"))["workerGroupSpecs"]
                 if "google.com/tpu" in resources_of(g))
    bad = yaml.safe_load(yaml.safe_dump(group))
    bad["numOfHosts"] = 1  # a 4x4 v6e slice spans 4 hosts
    assert tpu_group_problems(bad, "bad")
    bad["template"]["spec"]["nodeSelector"].pop("cloud.google.com/gke-tpu-topology")
    assert tpu_group_problems(bad, "bad")


def test_rayjob_runs_one_job_spec_mounted_on_the_head():
    from peftray.jobspec import load_spec

    job = _one("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "peftray.train"] and "--spec" in argv
    spec_path = argv[argv.index("--spec") + 1]
    head = ray_cluster_spec(job)["headGroupSpec"]["template"]["spec"]
    mount = next(m for c in head["containers"] for m in c.get("volumeMounts", [])
                 if spec_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    configmaps = {d["metadata"]["name"]: d for p in KUBERAY for d in load_docs(p) if d["kind"] == "ConfigMap"}
    text = configmaps[volume["configMap"]["name"]]["data"][spec_path.rsplit("/", 1)[1]]
    spec = load_spec(text)  # the spec the job will run is a valid peftray job spec
    assert spec.resources.use_gpu and spec.resources.num_workers == 2
    gpu_groups = [g for g in ray_cluster_spec(job)["workerGroupSpecs"] if "nvidia.com/gpu" in resources_of(g)]
    assert sum(g["replicas"] for g in gpu_groups) >= spec.resources.num_workers


def test_rayservice_serves_and_survives_head_failure():
    svc = _one("RayService")
    apps = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert apps and all(re.fullmatch(r"peftray\.serve[\w.]*:\w+", a["import_path"]) for a in apps)
    for app in apps:
        # The import path names a real application builder and its args are a valid serve spec, with no
        # per-deployment overrides naming deployments the app does not have.
        module, attr = app["import_path"].split(":")
        builder = getattr(__import__(module, fromlist=[attr]), attr)
        assert list(inspect.signature(builder).parameters) == ["args"]
        spec = load_serve_config(app["args"])
        assert spec.device == "cuda" and spec.num_gpus >= 1 and spec.base_model.startswith("s3://")
        assert not app.get("deployments")
    ft = ray_cluster_spec(svc)["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and ft["externalStorageNamespace"]
    assert "secretKeyRef" in ft["redisPassword"]["valueFrom"]


@pytest.mark.parametrize("path", ALL_MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_secret_values_inline(path):
    problems = text_secret_problems(path.read_text(), path.name)
    for doc in load_docs(path):
        problems += inline_secret_problems(doc, path.name)
    assert problems == []


def test_secret_check_catches_inline_values():
    doc = {"kind": "Pod", "spec": {"containers": [{"image": "x:1", "env": [
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]}]}}
    assert inline_secret_problems(doc, "pod")
    assert inline_secret_problems({"kind": "Secret", "stringData": {"token": "x"}}, "secret")
    assert text_secret_problems("key: AKIAABCDEFGHIJKLMNOP", "f")


@pytest.mark.parametrize("path", ALL_MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_images_pinned_and_on_project_version(path):
    problems = [p for doc in load_docs(path) for c in containers(doc)
                for p in image_problems(c["image"], VERSION, f"{path.name}:{c.get('name')}")]
    if path == COMPOSE:
        problems += [p for name, s in load_docs(path)[0]["services"].items()
                     for p in image_problems(compose_image(s["image"]), VERSION, f"compose:{name}")]
    assert problems == []
    assert compose_image("${PEFTRAY_IMAGE:-ghcr.io/peftray/peftray}:0.1.0") == f"{PEFTRAY_IMAGE}:0.1.0"
    assert image_problems(f"{PEFTRAY_IMAGE}:0.0.1", VERSION, "x") and image_problems("redis", VERSION, "x")


def test_every_peftray_version_agrees_with_pyproject():
    files = [*ALL_MANIFESTS, *sorted((ROOT / "cluster").glob("*.yaml")), ROOT / "infra" / "docker" / "Dockerfile"]
    problems = [p for f in files for p in wheel_version_problems(f.read_text(), VERSION, f.name)
                + index_install_problems(f.read_text(), f.name)]
    labels = [m["app.kubernetes.io/version"] for p in KUBERAY + INFRA_K8S for d in load_docs(p)
              for m in walk(d) if "app.kubernetes.io/version" in m]
    assert problems == [] and labels and set(labels) == {VERSION}
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^ARG PEFTRAY_VERSION={re.escape(VERSION)}$", dockerfile, re.M)
    assert re.search(rf"^ARG RAY_IMAGE=rayproject/ray:{re.escape(ray.__version__)}-py3\d+$", dockerfile, re.M)


def test_infra_k8s_is_complete_and_mlflow_uses_postgres_and_s3():
    listed = set(yaml.safe_load((ROOT / "infra" / "k8s" / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in INFRA_K8S}
    docs = {(d["kind"], d["metadata"]["name"]): d for p in INFRA_K8S for d in load_docs(p) if "metadata" in d}
    mlflow = containers(docs[("Deployment", "mlflow")])[0]
    args = " ".join(mlflow["args"])
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args and "--artifacts-destination=s3://" in args
    db_env = next(e for e in mlflow["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert "secretKeyRef" in db_env["valueFrom"]
    assert ("StatefulSet", "postgres") in docs and ("StatefulSet", "seaweedfs") in docs


def test_compose_parses_and_binds_loopback_only():
    compose = load_docs(COMPOSE)[0]
    assert {"postgres", "seaweedfs", "mlflow", "ray-head"} <= set(compose["services"])
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published), published
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", key):
                assert re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", str(value)), f"{name}.{key} must come from .env"
    assert "postgresql" in compose["services"]["mlflow"]["command"]


def test_rayservice_builder_needs_a_key_and_builds_the_app(monkeypatch):
    from ray.serve import Application

    from peftray.errors import PeftrayError
    from peftray.serve.app import app_builder

    args = yaml.safe_load(_one("RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    monkeypatch.delenv("PEFTRAY_SERVE_API_KEY", raising=False)
    with pytest.raises(PeftrayError, match="PEFTRAY_SERVE_API_KEY"):
        app_builder(args)
    monkeypatch.setenv("PEFTRAY_SERVE_API_KEY", "k" * 32)
    assert isinstance(app_builder(args), Application)
    with pytest.raises(Exception, match="max_adapters_per_replica"):
        app_builder({**args, "max_adapters_per_replica": 0})
