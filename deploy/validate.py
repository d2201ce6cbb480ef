#!/usr/bin/env python3
"""Validates the deployment files: the Kubernetes manifests parse as YAML, the embedded CNI
chain parses as JSON and names datapath-cni, and, when kubernetes-validate is installed, every
object passes the Kubernetes schema."""
import json
import pathlib
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent
failures = 0
checked = 0
for manifest in sorted((root / "kubernetes").glob("*.yaml")):
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    for doc in docs:
        checked += 1
        if doc.get("kind") == "ConfigMap":
            for name, text in doc.get("data", {}).items():
                if name.endswith(".conflist"):
                    chain = json.loads(text)
                    types = [p["type"] for p in chain["plugins"]]
                    if "datapath-cni" not in types or "egress-v4-cni" in types:
                        print(f"{manifest.name}: {name}: chain {types} must use datapath-cni instead of egress-v4")
                        failures += 1
    try:
        import kubernetes_validate
    except ImportError:
        print(f"{manifest.name}: YAML ok ({len(docs)} objects); kubernetes-validate not installed, schema not checked")
        continue
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, "1.30", strict=True)
        except Exception as e:  # the validator raises several error types
            print(f"{manifest.name}: {doc.get('kind')} {doc['metadata']['name']}: {e}")
            failures += 1
    print(f"{manifest.name}: {len(docs)} objects valid against the Kubernetes 1.30 schema")
print(f"{checked} objects checked, {failures} problems")
sys.exit(1 if failures else 0)
