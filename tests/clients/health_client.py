#!/usr/bin/python3
"""A real gRPC client (Debian's python3-grpcio), with stubs generated from the
project's .proto at run time: checks a kvmesh server's health service.
Usage: health_client.py HOST:PORT  (exit 0 when every check holds)."""
import os
import subprocess
import sys
import tempfile

import grpc

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
out = tempfile.mkdtemp()
subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I" + os.path.join(root, "proto"),
                "--python_out=" + out, "--grpc_python_out=" + out,
                os.path.join(root, "proto", "health.proto")], check=True)
sys.path.insert(0, out)
import health_pb2  # noqa: E402
import health_pb2_grpc  # noqa: E402

channel = grpc.insecure_channel(sys.argv[1])
stub = health_pb2_grpc.HealthStub(channel)

resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
assert resp.status == health_pb2.HealthCheckResponse.SERVING, resp

try:
    stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    raise AssertionError("unknown service answered")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.NOT_FOUND, e
    assert "no.such.Service" in e.details(), e.details()

watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
first = next(watch)
assert first.status == health_pb2.HealthCheckResponse.SERVING, first
watch.cancel()
print("python health client: all checks passed")
