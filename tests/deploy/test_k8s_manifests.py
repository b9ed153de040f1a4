"""Kubernetes manifests: strict validation against the Kubernetes JSON schemas bundled in
`kubernetes-validate` (offline), the ServiceMonitor against tests/deploy/servicemonitor.schema.json
(a minimal schema of the Prometheus Operator CRD), and the references between the objects."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from .interface_metrics import DEPLOY, interface_metrics

K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30"  # oldest supported: the native preStop sleep action is on by default there
MONITOR_SCHEMA = Path(__file__).with_name("servicemonitor.schema.json")
MANIFESTS = sorted(K8S.glob("*.yaml")) + sorted((K8S / "gpu").glob("*.yaml"))


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str, directory: Path = K8S) -> dict:
    docs = [d for p in sorted(directory.glob("*.yaml")) for d in load(p) if d["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind} in {directory}, found {len(docs)}"
    return docs[0]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid(path):
    for doc in load(path):
        if doc["kind"] == "ServiceMonitor":
            jsonschema.validate(doc, json.loads(MONITOR_SCHEMA.read_text()))
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_rejects_a_typo():
    doc = copy.deepcopy(by_kind("Deployment"))
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_servicemonitor_schema_rejects_bad_objects():
    schema = json.loads(MONITOR_SCHEMA.read_text())
    good = by_kind("ServiceMonitor")
    for mutate in (lambda d: d["spec"].pop("selector"),
                   lambda d: d["spec"]["endpoints"][0].update(interval="5 seconds"),
                   lambda d: d["spec"]["endpoints"][0].update(pathh="/metrics"),
                   lambda d: d.update(apiVersion="monitoring.coreos.com/v2")):
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def pod_spec(directory: Path = K8S) -> dict:
    return by_kind("Deployment", directory)["spec"]["template"]["spec"]


@pytest.mark.parametrize("directory", [K8S, K8S / "gpu"], ids=["cpu", "gpu"])
def test_probes_ports_and_resources(directory):
    dep = by_kind("Deployment", directory)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = pod_spec(directory)["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert int(env["CAMEX_PORT"]) == c["ports"][0]["containerPort"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod_spec(directory)["securityContext"]["runAsNonRoot"] is True


def test_gpu_variant_requests_a_gpu_and_uses_cuda():
    (c,) = pod_spec(K8S / "gpu")["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CAMEX_DEVICE"] == "cuda"
    assert by_kind("Deployment", K8S / "gpu")["metadata"]["name"] == "camex-server"


def test_objects_reference_each_other():
    dep, svc = by_kind("Deployment"), by_kind("Service")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    pdb = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    mon = by_kind("ServiceMonitor")
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"


def test_hpa_scales_the_deployment_on_waiting_requests():
    hpa, dep = by_kind("HorizontalPodAutoscaler"), by_kind("Deployment")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "camex_waiting_requests"
    assert "camex_waiting_requests" in interface_metrics()
    assert hpa["spec"]["minReplicas"] > by_kind("PodDisruptionBudget")["spec"]["minAvailable"]
