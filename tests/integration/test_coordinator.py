#!/usr/bin/python3
"""kvmesh-coordinator as a real process, driven by a Python gRPC client built
from kvmesh.proto: registration, heartbeats, liveness, cordon/drain, models,
events, restart recovery, and clear errors for bad input."""
import time

import grpc

from kvmesh_testlib import Coordinator, kvmesh_pb2 as pb, run_tests


def node_msg(i, blocks=1000):
    return pb.Node(id="node%d" % i, grpc_address="127.0.0.1:%d" % (7500 + i),
                   data_address="127.0.0.1:%d" % (7600 + i),
                   hardware=pb.Hardware(cores=8, memory_bytes=64 << 30, nics=[
                       pb.Nic(name="eth0", kind=pb.LINK_TCP, speed_gbps=25, up=True)]),
                   capacity=[pb.TierCapacity(tier=pb.TIER_HOST, total_blocks=blocks,
                                             free_blocks=blocks)])


def expect_error(code, fn, *args, contains=""):
    try:
        fn(*args, timeout=5)
    except grpc.RpcError as e:
        assert e.code() == code, (e.code(), e.details())
        assert contains in e.details(), e.details()
        return e.details()
    raise AssertionError("expected %s" % code)


def test_register_heartbeat_list():
    c = Coordinator(heartbeat="200ms", **{"dead-after": "2s"})
    try:
        epochs = {}
        for i in range(3):
            r = c.stub.RegisterNode(pb.RegisterNodeRequest(node=node_msg(i)), timeout=5)
            assert r.node_id == "node%d" % i and r.epoch > 0 and r.heartbeat_ms == 200
            epochs[r.node_id] = r.epoch
        hb = c.stub.Heartbeat(pb.HeartbeatRequest(
            node_id="node1", epoch=epochs["node1"], load=0.25,
            capacity=[pb.TierCapacity(tier=pb.TIER_HOST, total_blocks=1000, free_blocks=900,
                                      used_blocks=100)]), timeout=5)
        assert len(hb.commands) == 0
        nodes = {n.id: n for n in c.stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes}
        assert set(nodes) == {"node0", "node1", "node2"}
        n1 = nodes["node1"]
        assert n1.state == pb.NODE_READY and abs(n1.load - 0.25) < 1e-9
        assert n1.hardware.nics[0].speed_gbps == 25
        host = [t for t in n1.capacity if t.tier == pb.TIER_HOST][0]
        assert host.used_blocks == 100 and host.total_blocks == 1000
        assert n1.lend_cap_blocks == 500
        # A stale epoch and an unknown node are refused, with the reason.
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, c.stub.Heartbeat,
                     pb.HeartbeatRequest(node_id="node1", epoch=1), contains="register again")
        expect_error(grpc.StatusCode.NOT_FOUND, c.stub.Heartbeat,
                     pb.HeartbeatRequest(node_id="ghost", epoch=1), contains="ghost")
    finally:
        c.close()


def test_silent_node_dies_and_watchers_hear_it():
    c = Coordinator(heartbeat="100ms", **{"dead-after": "600ms"})
    try:
        events = c.stub.WatchEvents(pb.WatchEventsRequest(), timeout=10)
        time.sleep(0.2)
        r = c.stub.RegisterNode(pb.RegisterNodeRequest(node=node_msg(7)), timeout=5)
        seen = []
        for ev in events:
            seen.append((ev.node.node_id, ev.node.state, ev.node.reason))
            if ev.node.state == pb.NODE_DEAD:
                break
        assert seen[0][:2] == ("node7", pb.NODE_READY), seen
        assert seen[-1][:2] == ("node7", pb.NODE_DEAD) and "no heartbeat" in seen[-1][2], seen
        events.cancel()
        nodes = c.stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes
        assert nodes[0].state == pb.NODE_DEAD
        # A dead node's heartbeat says to register again; registering revives it.
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, c.stub.Heartbeat,
                     pb.HeartbeatRequest(node_id="node7", epoch=r.epoch), contains="dead")
        c.stub.RegisterNode(pb.RegisterNodeRequest(node=node_msg(7)), timeout=5)
        assert c.stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes[0].state == pb.NODE_READY
    finally:
        c.close()


def nodes_by_id(c):
    return {n.id: n for n in c.stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes}


def test_cordon_and_drain():
    c = Coordinator(heartbeat="1s", **{"dead-after": "10s"})
    try:
        r = c.stub.RegisterNode(pb.RegisterNodeRequest(node=node_msg(1)), timeout=5)
        n = c.stub.CordonNode(pb.NodeRequest(node_id="node1"), timeout=5)
        assert n.state == pb.NODE_CORDONED
        n = c.stub.DrainNode(pb.NodeRequest(node_id="node1"), timeout=5)
        assert n.state == pb.NODE_DRAINING
        hb = c.stub.Heartbeat(pb.HeartbeatRequest(node_id="node1", epoch=r.epoch), timeout=5)
        assert len(hb.commands) == 1 and hb.commands[0].HasField("drain")
        expect_error(grpc.StatusCode.NOT_FOUND, c.stub.CordonNode,
                     pb.NodeRequest(node_id="nope"), contains="nope")
        # Cordoning a draining node leaves it draining.
        n = c.stub.CordonNode(pb.NodeRequest(node_id="node1"), timeout=5)
        assert n.state == pb.NODE_DRAINING
        # A drain outlives a coordinator restart and the node's re-registration.
        c.stop(sig="KILL")
        c.start()
        assert nodes_by_id(c)["node1"].state == pb.NODE_DRAINING
        c.stub.RegisterNode(pb.RegisterNodeRequest(node=node_msg(1)), timeout=5)
        assert nodes_by_id(c)["node1"].state == pb.NODE_DRAINING
        # No new home on it.
        c.stub.RegisterModel(model(), timeout=5)
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, c.stub.CreateSequence,
                     pb.CreateSequenceRequest(model_id="llama-tiny", sequence_id="s",
                                              home_node="node1"), contains="draining")
        # Uncordon undoes it, durably.
        n = c.stub.UncordonNode(pb.NodeRequest(node_id="node1"), timeout=5)
        assert n.state == pb.NODE_READY
        c.stop(sig="KILL")
        c.start()
        assert nodes_by_id(c)["node1"].state == pb.NODE_READY
        c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="llama-tiny", sequence_id="s",
                                                       home_node="node1"), timeout=5)
    finally:
        c.close()


def model(mid="llama-tiny", kv_heads=2, q_heads=8):
    return pb.Model(id=mid, q_heads=q_heads, geometry=pb.BlockGeometry(
        layers=4, kv_heads=kv_heads, head_dim=128, block_tokens=16, dtype=pb.KV_DTYPE_F16))


def test_models_validated_and_durable_across_restart():
    c = Coordinator()
    try:
        assert c.stub.RegisterModel(model(), timeout=5).id == "llama-tiny"
        assert c.stub.RegisterModel(model(), timeout=5).id == "llama-tiny"  # idempotent
        expect_error(grpc.StatusCode.ALREADY_EXISTS, c.stub.RegisterModel,
                     model(kv_heads=4), contains="another geometry")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, c.stub.RegisterModel,
                     model("bad", kv_heads=3, q_heads=8), contains="multiple")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, c.stub.RegisterModel,
                     pb.Model(id="has space", q_heads=1), contains="id must be")
        c.stub.RegisterNode(pb.RegisterNodeRequest(node=node_msg(3)), timeout=5)
        # A hard kill (no clean shutdown) loses nothing acknowledged.
        c.stop(sig="KILL")
        c.start()
        models = c.stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        assert [m.id for m in models] == ["llama-tiny"]
        assert models[0].geometry.block_tokens == 16
        nodes = c.stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes
        assert [n.id for n in nodes] == ["node3"]
    finally:
        c.close()


def test_bad_input_is_clear():
    c = Coordinator()
    try:
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, c.stub.RegisterNode,
                     pb.RegisterNodeRequest(node=pb.Node(id="x")), contains="grpc_address")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, c.stub.RegisterNode,
                     pb.RegisterNodeRequest(), contains="node.id")
        raw = c.channel.unary_unary("/kvmesh.v1.Coordinator/RegisterNode")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, raw, b"\xff\xff\xff\xff",
                     contains="malformed")
        expect_error(grpc.StatusCode.NOT_FOUND, c.stub.MatchPrefix,
                     pb.MatchPrefixRequest(model_id="m"), contains="unknown model")
    finally:
        c.close()


def test_second_coordinator_on_same_data_dir_refused():
    c = Coordinator()
    try:
        import subprocess
        import os
        from kvmesh_testlib import BUILD, free_port
        p = subprocess.run([os.path.join(BUILD, "bin", "kvmesh-coordinator"),
                            "--listen=127.0.0.1:%d" % free_port(), "--data-dir=" + c.data_dir],
                           capture_output=True, timeout=10)
        assert p.returncode != 0
        assert b"another coordinator" in p.stderr, p.stderr
    finally:
        c.close()


def test_kvmeshctl_tables_json_and_exit_codes():
    import json
    import os
    import subprocess
    from kvmesh_testlib import BUILD, free_port
    # Its nodes never heartbeat: they must outlive the test on a slow run
    # (under ASan on a busy machine it took more than the default 3 s).
    c = Coordinator(**{"dead-after": "60s"})
    ctl = os.path.join(BUILD, "bin", "kvmeshctl")

    def run(*args):
        p = subprocess.run([ctl, "--coordinator=127.0.0.1:%d" % c.port] + list(args),
                           capture_output=True, text=True, timeout=20)
        return p.returncode, p.stdout, p.stderr
    try:
        for i in range(2):
            c.stub.RegisterNode(pb.RegisterNodeRequest(node=node_msg(i, blocks=400)), timeout=5)
        c.stub.RegisterModel(model(), timeout=5)
        rc, out, _ = run("nodes")
        assert rc == 0 and "node0" in out and "ready" in out and "400" in out, out
        rc, out, _ = run("-o", "json", "nodes")
        nodes = json.loads(out)
        assert rc == 0 and sorted(n["id"] for n in nodes) == ["node0", "node1"], out
        assert nodes[0]["total_blocks"] == 400 and nodes[0]["lend_cap_blocks"] == 200
        rc, out, _ = run("-o", "json", "models")
        assert rc == 0 and json.loads(out)[0]["dtype"] == "f16", out
        rc, out, _ = run("cordon", "node1")
        assert rc == 0 and "cordoned" in out, out
        rc, out, _ = run("-o", "json", "drain", "node1")
        assert rc == 0 and json.loads(out)["state"] == "draining", out
        assert json.loads(out)["drain_blocks_left"] == 0, out
        rc, out, _ = run("nodes")
        assert rc == 0 and "node1: drained" in out, out
        rc, out, _ = run("uncordon", "node1")
        assert rc == 0 and "ready" in out, out
        rc, _, err = run("cordon", "ghost")
        assert rc == 4 and "ghost" in err, err
        rc, _, err = run("frobnicate")
        assert rc == 2 and "unknown command" in err, err
        rc, _, err = run("-o", "yaml", "nodes")
        assert rc == 2, err
        p = subprocess.run([ctl, "--coordinator=127.0.0.1:%d" % free_port(), "--timeout=1s",
                            "nodes"], capture_output=True, text=True, timeout=20)
        assert p.returncode == 3, (p.returncode, p.stderr)
        # watch streams events as JSON lines until interrupted
        w = subprocess.Popen([ctl, "--coordinator=127.0.0.1:%d" % c.port, "-o", "json", "watch"],
                             stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        c.stub.RegisterNode(pb.RegisterNodeRequest(node=node_msg(5)), timeout=5)
        line = w.stdout.readline()
        ev = json.loads(line)
        assert ev["node"] == "node5" and ev["state"] == "ready", line
        # sequence events are JSON lines too, named
        c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="llama-tiny", sequence_id="w1",
                                                       home_node="node0"), timeout=5)
        c.stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="w1"), timeout=5)
        seen = [json.loads(w.stdout.readline()) for _ in range(2)]
        w.terminate()
        w.wait(timeout=10)
        assert [(e["sequence"], e["event"]) for e in seen] == [("w1", "created"), ("w1", "released")], seen
        # a watcher that lost its stream resumes after the last seq it saw
        w = subprocess.Popen([ctl, "--coordinator=127.0.0.1:%d" % c.port, "-o", "json", "watch",
                              str(ev["seq"])], stdout=subprocess.PIPE, text=True)
        again = [json.loads(w.stdout.readline()) for _ in range(2)]
        w.terminate()
        w.wait(timeout=10)
        assert again == seen, (again, seen)
        rc, _, err = run("watch", "soon")
        assert rc == 2 and "not an event seq" in err, err
    finally:
        c.close()


if __name__ == "__main__":
    run_tests([test_register_heartbeat_list, test_silent_node_dies_and_watchers_hear_it,
               test_cordon_and_drain, test_models_validated_and_durable_across_restart,
               test_bad_input_is_clear,
               test_second_coordinator_on_same_data_dir_refused,
               test_kvmeshctl_tables_json_and_exit_codes])
