"""Fixtures: Python stubs generated from proto/ at test time, and a running
`spine dev` on a free loopback port."""

import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Generates the stubs with grpcio-tools and imports them."""
    from grpc_tools import protoc
    import grpc_tools

    out = tmp_path_factory.mktemp("gen")
    protos = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{PROTO}", f"-I{wkt}", f"--python_out={out}", f"--grpc_python_out={out}", *protos])
    assert rc == 0, f"protoc failed for {protos}"
    sys.path.insert(0, str(out))
    mods = {
        "identity": importlib.import_module("spine.identity.v1.identity_pb2"),
        "identity_grpc": importlib.import_module("spine.identity.v1.identity_pb2_grpc"),
        "common": importlib.import_module("spine.common.v1.common_pb2"),
        "groups": importlib.import_module("spine.groups.v1.groups_pb2"),
        "groups_grpc": importlib.import_module("spine.groups.v1.groups_pb2_grpc"),
        "calls": importlib.import_module("spine.calls.v1.calls_pb2"),
        "calls_grpc": importlib.import_module("spine.calls.v1.calls_pb2_grpc"),
    }
    return type("Stubs", (), mods)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def spine(tmp_path_factory):
    """A `spine dev` process; yields (address, operator credential)."""
    binary = os.environ.get("SPINE_BIN", str(ROOT / "target" / "debug" / "spine"))
    assert Path(binary).exists(), f"{binary} missing: build it with `cargo build -p spine`"
    state = tmp_path_factory.mktemp("spine-dev")
    port = free_port()
    addr = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [binary, "dev", "--listen", addr, "--state-dir", str(state)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        channel = grpc.insecure_channel(addr)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        while True:
            try:
                r = health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING and (state / "operator-token").exists():
                    break
            except grpc.RpcError:
                pass
            assert proc.poll() is None, "spine dev exited"
            assert time.monotonic() < deadline, "spine dev not ready in 30 s"
            time.sleep(0.05)
        yield addr, (state / "operator-token").read_text().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
