#!/usr/bin/env python3
"""Validates the deployment files: the Helm chart lints and renders with the real Helm engine
(helm-python-sdk) under several value sets, deploy/kubernetes/datapath.yaml is what the chart
renders, and every object passes the Kubernetes schema (kubernetes-validate). The PodMonitor
is a CRD outside that schema: its fields are checked here."""
import pathlib
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(root))

import render  # noqa: E402  (deploy/render.py)
import helm_python as helm  # noqa: E402
import kubernetes_validate  # noqa: E402

KUBE_VERSION = "1.30"
VARIANTS = {
    "defaults": {},
    "everything set": {
        "uplink": "ens5",
        "nodeIP": "192.0.2.10",
        "portRange": "20000-29999",
        "flowTableSize": 1048576,
        "timeouts": {"tcpEstablished": 3600, "udp": 20},
        "metrics": {"port": 9500, "podMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "image": {"repository": "registry.example/datapath", "tag": "v1"},
        "extraArgs": ["--sweep-interval=2"],
    },
}

failures = 0


def fail(msg):
    global failures
    print(msg)
    failures += 1


def check_pod_monitor(doc, port_name):
    endpoints = doc.get("spec", {}).get("podMetricsEndpoints", [])
    if not endpoints or endpoints[0].get("port") != port_name or endpoints[0].get("path") != "/metrics":
        fail(f"PodMonitor: endpoints {endpoints} must scrape port {port_name} at /metrics")
    if not doc["spec"].get("selector", {}).get("matchLabels"):
        fail("PodMonitor: no selector")


def check_daemonset(doc, values):
    spec = doc["spec"]["template"]["spec"]
    container = spec["containers"][0]
    args = container["args"]
    for want in ("--cni-conf-dir=/host/etc/cni/net.d", "--cni-bin-dir=/host/opt/cni/bin"):
        if want not in args:
            fail(f"DaemonSet: {want} missing from {args}")
    if values.get("uplink") and f"--uplink={values['uplink']}" not in args:
        fail(f"DaemonSet: --uplink not passed: {args}")
    if not values.get("uplink") and any(a.startswith("--uplink") for a in args):
        fail("DaemonSet: --uplink passed without a value set")
    probes = (container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["httpGet"]["path"])
    if probes != ("/healthz", "/readyz"):
        fail(f"DaemonSet: probes {probes}")
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = {e["key"]: e for e in terms[0]["matchExpressions"]}
    if keys.get("eks.amazonaws.com/compute-type", {}).get("values") != ["fargate", "hybrid", "auto"]:
        fail("DaemonSet: aws-node's node affinity missing")
    if not spec.get("hostNetwork"):
        fail("DaemonSet: not on the host network")


lint = helm.lint(str(render.CHART), strict=True, kube_version=f"v{KUBE_VERSION}.0")
for message in lint.get("messages", []):
    if message.get("severity", 0) >= 2:
        fail(f"helm lint: {message}")
checked = 0
for variant, values in VARIANTS.items():
    docs = [d for d in yaml.safe_load_all(render.render(values)) if d]
    kinds = sorted(d["kind"] for d in docs)
    for doc in docs:
        checked += 1
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            check_pod_monitor(doc, "metrics")
            continue
        if doc["kind"] == "DaemonSet":
            check_daemonset(doc, values)
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except Exception as e:  # the validator raises several error types
            fail(f"{variant}: {doc['kind']} {doc['metadata']['name']}: {e}")
    print(f"chart with {variant}: {', '.join(kinds)} rendered and valid against the Kubernetes {KUBE_VERSION} schema")
    if variant == "everything set" and "PodMonitor" not in kinds:
        fail("podMonitor.enabled rendered no PodMonitor")

manifest = root / "kubernetes" / "datapath.yaml"
if manifest.read_text() != render.HEADER + "---\n" + render.render():
    fail(f"{manifest.name} is not what the chart renders: run python3 deploy/render.py")
print(f"{checked} objects checked, {failures} problems")
sys.exit(1 if failures else 0)
