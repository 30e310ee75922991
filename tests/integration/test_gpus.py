#!/usr/bin/python3
"""GPU discovery (node-agent/gpus.c): an agent loads the CUDA driver at run
time; with the tests' fake driver (build/tests/fake/libcuda.so.1, two fixed
GPUs, chosen with KVMESH_LIBCUDA) it registers its GPUs, which ListNodes and
`kvmeshctl nodes` show; without a driver, or when cuInit fails, it has none,
says why once in its log, and serves all the same."""
import json
import os
import subprocess

import grpc

from kvmesh_testlib import (BUILD, Agent, Coordinator, kvmesh_pb2 as pb, kvmesh_pb2_grpc as pbg, list_nodes, run_tests,
                            wait_for)

MODEL = pb.Model(id="tiny", q_heads=8, geometry=pb.BlockGeometry(
    layers=4, kv_heads=2, head_dim=64, block_tokens=16, dtype=pb.KV_DTYPE_F16))
FAKE = os.path.join(BUILD, "tests", "fake", "libcuda.so.1")
H200 = ("NVIDIA H200", 150754820096, 9, 0, "0000:19:00.0")
A100 = ("NVIDIA A100-SXM4-80GB", 85899345920, 8, 0, "0000:3B:00.0")


def ready_node(c, node_id):
    return wait_for(node_id + " ready", lambda: node_id in list_nodes(c) and
                    list_nodes(c)[node_id].state == pb.NODE_READY and list_nodes(c)[node_id])


def with_agent(env, check):
    c = Coordinator()
    a = None
    try:
        c.stub.RegisterModel(MODEL, timeout=5)
        a = Agent(c, "g0", "tiny", host_pool="16MiB", env=env)
        check(c, a, ready_node(c, "g0"))
    finally:
        if a:
            a.close()
        c.close()


def ctl(c, *args):
    p = subprocess.run([os.path.join(BUILD, "bin", "kvmeshctl"),
                        "--coordinator=127.0.0.1:%d" % c.port] + list(args),
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_agent_registers_the_gpus_its_driver_reports():
    def check(c, a, node):
        got = [(g.name, g.memory_bytes, g.compute_major, g.compute_minor, g.pci_bus_id)
               for g in node.hardware.gpus]
        assert got == [H200, A100], got
        assert [g.index for g in node.hardware.gpus] == [0, 1]
        js = [n for n in json.loads(ctl(c, "nodes", "-o", "json")) if n["id"] == "g0"][0]
        gpus = js["hardware"]["gpus"]
        assert [(g["name"], g["memory_bytes"], g["compute_capability"], g["pci_bus_id"])
                for g in gpus] == [(H200[0], H200[1], "9.0", H200[4]),
                                   (A100[0], A100[1], "8.0", A100[4])], gpus
        table = ctl(c, "nodes")
        assert "GPUS" in table.splitlines()[0], table
        row = [ln for ln in table.splitlines() if ln.startswith("g0 ")][0]
        assert "2x NVIDIA H200 140GiB +" in row, row
        log = a.read_log()
        assert log.count("event=gpu ") == 2 and 'name="NVIDIA H200"' in log, log
    with_agent({"KVMESH_LIBCUDA": FAKE}, check)


def test_agent_without_a_driver_has_no_gpus_and_serves():
    def check(c, a, node):
        assert len(node.hardware.gpus) == 0 and node.hardware.cores >= 1
        js = [n for n in json.loads(ctl(c, "nodes", "-o", "json")) if n["id"] == "g0"][0]
        assert js["hardware"]["gpus"] == [], js
        row = [ln for ln in ctl(c, "nodes").splitlines() if ln.startswith("g0 ")][0]
        assert row.rstrip().endswith(" -"), row
        with grpc.insecure_channel("127.0.0.1:%d" % a.port) as ch:
            assert pbg.AgentStub(ch).Stats(pb.StatsRequest(), timeout=5).capacity
        log = a.read_log()
        assert log.count("event=no_gpus") == 1 and "no CUDA driver" in log \
            and "/nonexistent/libcuda.so.1" in log, log
    with_agent({"KVMESH_LIBCUDA": "/nonexistent/libcuda.so.1"}, check)


def test_a_failing_cuinit_means_no_gpus_with_its_error():
    def check(c, a, node):
        assert len(node.hardware.gpus) == 0
        log = a.read_log()
        assert log.count("event=no_gpus") == 1, log
        assert "cuInit failed: error 100 CUDA_ERROR_NO_DEVICE" in log, log
    with_agent({"KVMESH_LIBCUDA": FAKE, "FAKE_CUDA_INIT_ERROR": "100"}, check)


if __name__ == "__main__":
    run_tests([test_agent_registers_the_gpus_its_driver_reports,
               test_agent_without_a_driver_has_no_gpus_and_serves,
               test_a_failing_cuinit_means_no_gpus_with_its_error])
