"""The deployment files (deploy/kubernetes, Dockerfile) are valid and agree
with each other and with the binary, without a cluster or a Docker daemon.

* Kubernetes' own kinds are checked strictly (unknown fields are errors)
  against the schemas `kubernetes-validate` bundles, as `kubectl apply
  --dry-run=client --validate=strict` would; KEDA's and KServe's kinds
  against the JSON schemas in deploy/kubernetes/schemas (the fields used),
  with a ServingRuntime's containers checked as a Pod's.
* Cross-references: Services select their Deployments' labels, KEDA scales an
  existing Deployment and polls the front Service's route for a configured
  model, the queue URL names the Redis Service, every `kiln` flag a manifest
  passes exists in `kiln serve --help` / `kiln worker --help`, and every
  probe path answers 200 on a running `kiln serve`.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml

from conftest import REPO_ROOT, kiln_bin

DEPLOY = REPO_ROOT / "deploy" / "kubernetes"
SCHEMAS = DEPLOY / "schemas"
K8S_VERSION = "1.37.0"
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-kserve-v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-kserve-v1beta1.json",
}


def documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def kiln_containers() -> list[dict]:
    containers = []
    for _, doc in documents():
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", {}) if "template" in spec else spec
        for container in pod.get("containers", []):
            if "kiln" in container["image"]:
                containers.append(container)
    return containers


def test_there_are_manifests_for_each_part():
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"Deployment", "Service", "StatefulSet", "ConfigMap", "ScaledObject",
            "ServingRuntime", "InferenceService"} <= kinds, kinds


@pytest.mark.parametrize("path,doc", documents(),
                         ids=lambda v: v.name if isinstance(v, Path) else v.get("kind"))
def test_each_manifest_validates(path, doc):
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        schema = json.loads((SCHEMAS / CRD_SCHEMAS[key]).read_text())
        jsonschema.validate(doc, schema)
        if doc["kind"] == "ServingRuntime":
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"},
                   "spec": {"containers": doc["spec"]["containers"]}}
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        pytest.fail(f"{path.name}: no schema for {key}; add one to deploy/kubernetes/schemas")


def test_a_broken_manifest_is_caught():
    """The validators do reject things (a misspelt field, a bad trigger)."""
    deployment = of_kind("Deployment")[0]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    scaled = json.loads(json.dumps(of_kind("ScaledObject")[0]))
    del scaled["spec"]["triggers"][0]["metadata"]["valueLocation"]
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")]).read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, schema)


def test_services_select_their_pods_and_keda_scales_a_worker():
    workloads = of_kind("Deployment") + of_kind("StatefulSet")
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        matched = [w for w in workloads
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert matched, f"Service {service['metadata']['name']} selects no pods"
        ports = {p["name"] for w in matched
                 for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port}"

    config = tomllib.loads(of_kind("ConfigMap")[0]["data"]["kiln.toml"])
    models = {m["name"] for m in config["models"]}
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    deployments = {d["metadata"]["name"] for d in of_kind("Deployment")}
    for scaled in of_kind("ScaledObject"):
        assert scaled["spec"]["scaleTargetRef"]["name"] in deployments
        for trigger in scaled["spec"]["triggers"]:
            url = trigger["metadata"]["url"]
            match = re.fullmatch(r"http://([a-z0-9-]+)\.[a-z0-9-]+\.svc\.cluster\.local/v2/([^/]+)/health", url)
            assert match, url
            assert match.group(1) in services and services[match.group(1)]["spec"]["ports"][0]["port"] == 80
            assert match.group(2) in models, (match.group(2), models)
            # What KEDA reads is what /v2/{model}/health returns (RunPod's shape).
            assert trigger["metadata"]["valueLocation"] in ("jobs.inQueue", "jobs.inProgress")

    queue = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", config["queue"]["url"])
    assert queue and queue.group(1) in services
    assert int(queue.group(2)) in [p["port"] for p in services[queue.group(1)]["spec"]["ports"]]


def test_every_kiln_flag_in_the_manifests_exists():
    binary = kiln_bin()
    helps = {}
    for container in kiln_containers():
        args = container["args"]
        assert args[0] in ("serve", "worker"), args
        if args[0] not in helps:
            helps[args[0]] = subprocess.run([str(binary), args[0], "--help"], capture_output=True,
                                            text=True, check=True).stdout
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"\s{re.escape(flag)}\b", helps[args[0]]), f"kiln {args[0]} has no {flag}"


def test_probe_paths_answer_on_a_running_kiln(kiln_server):
    paths = set()
    for container in kiln_containers():
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                paths.add(container[probe]["httpGet"]["path"])
    assert paths
    models = {m["name"] for m in tomllib.loads(of_kind("ConfigMap")[0]["data"]["kiln.toml"])["models"]}
    for path in sorted(paths):
        # A model's route, asked of the running server's own model.
        for name in models:
            path = path.replace(f"/v2/{name}/", f"/v2/{kiln_server.model}/")
        r = requests.get(f"{kiln_server.base_url}{path}", timeout=10)
        assert r.status_code == 200, f"{path}: HTTP {r.status_code}"


def test_the_dockerfile_builds_in_stages_and_runs_unprivileged():
    lines = []
    for raw in (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append(raw.strip())
    instructions = [(line.split()[0].upper(), line.split(None, 1)[1]) for line in lines]
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert len(stages) >= 2, "a build stage and a runtime stage"
    runtime = instructions[stages[-1]:]
    ops = dict(runtime)
    assert "cargo build --release --locked -p kiln --features" in " ".join(a for _, a in instructions)
    user = ops["USER"].split(":")[0]
    assert user not in ("root", "0"), "the runtime runs as a non-root user"
    assert "/v2/health/ready" in ops["HEALTHCHECK"]
    env = ops["ENV"]
    home = re.search(r"KILN_HOME=(\S+)", env).group(1)
    assert home in ops["VOLUME"], "KILN_HOME is a volume"
    assert json.loads(ops["ENTRYPOINT"]) == ["kiln"]
    assert "ARG FEATURES" in "\n".join(f"{op} {a}" for op, a in instructions)
