#!/usr/bin/python3
"""A coordinator and three kvmesh-agent processes on loopback: agents size
their pools from the model's geometry, register and heartbeat; a killed
agent is declared dead; after a coordinator crash the agents register again
on their own; SIGTERM stops an agent cleanly."""
import time

import grpc

from kvmesh_testlib import (Agent, Coordinator, kvmesh_pb2 as pb, kvmesh_pb2_grpc as pbg,
                            run_tests, wait_for)

MODEL = pb.Model(id="tiny", q_heads=8, geometry=pb.BlockGeometry(
    layers=4, kv_heads=2, head_dim=64, block_tokens=16, dtype=pb.KV_DTYPE_F16))
BLOCK_BYTES = 4 * 2 * 16 * 2 * 64 * 2  # layers * (k,v) * tokens * kv_heads * head_dim * fp16


def offered(pool_bytes):
    """Blocks an agent offers the ledger: its slots less the tail reserve."""
    slots = pool_bytes // BLOCK_BYTES
    return slots - max(2, slots // 16)


def nodes(c):
    return {n.id: n for n in c.stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes}


def ready(c, ids):
    ns = nodes(c)
    return all(i in ns and ns[i].state == pb.NODE_READY for i in ids) and ns


def test_three_agents_register_with_pools_sized_from_the_model():
    c = Coordinator(heartbeat="200ms", **{"dead-after": "1500ms"})
    agents = []
    try:
        c.stub.RegisterModel(MODEL, timeout=5)
        for i, pool in enumerate(["16MiB", "32MiB", "64MiB"]):
            agents.append(Agent(c, "agent%d" % i, "tiny", host_pool=pool))
        ns = wait_for("three ready agents", lambda: ready(c, ["agent0", "agent1", "agent2"]))
        for i, pool in enumerate([16, 32, 64]):
            host = [t for t in ns["agent%d" % i].capacity if t.tier == pb.TIER_HOST][0]
            assert host.total_blocks == offered(pool << 20), host
            assert host.free_blocks == host.total_blocks
        assert ns["agent0"].hardware.cores >= 1 and ns["agent0"].hardware.memory_bytes > 0
        # The agent's NICs as discovered here (loopback is left out).
        import os
        ifaces = [i for i in os.listdir("/sys/class/net") if i != "lo"]
        assert sorted(n.name for n in ns["agent0"].hardware.nics) == sorted(ifaces), \
            (ns["agent0"].hardware.nics, ifaces)
        # Agent.Stats over gRPC, from the agent itself.
        ch = grpc.insecure_channel("127.0.0.1:%d" % agents[2].port)
        st = pbg.AgentStub(ch).Stats(pb.StatsRequest(), timeout=5)
        assert st.capacity[0].total_blocks == offered(64 << 20)
        assert "sequences" in st.counters
        ch.close()
        # Heartbeats keep them alive well past dead-after.
        time.sleep(2)
        assert ready(c, ["agent0", "agent1", "agent2"])
        # A killed agent is declared dead; the others are not.
        killed = time.time()
        agents[1].stop(sig="KILL")
        wait_for("agent1 dead", lambda: nodes(c)["agent1"].state == pb.NODE_DEAD, timeout=5)
        # Detected within the configured timeout (1.5 s) plus one liveness tick.
        assert time.time() - killed < 1.5 + 0.5, time.time() - killed
        assert ready(c, ["agent0", "agent2"])
    finally:
        for a in agents:
            a.close()
        c.close()


def test_agents_register_again_after_a_coordinator_crash():
    c = Coordinator(heartbeat="200ms", **{"dead-after": "3s"})
    agents = []
    try:
        c.stub.RegisterModel(MODEL, timeout=5)
        agents = [Agent(c, "a%d" % i, "tiny", host_pool="8MiB") for i in range(2)]
        wait_for("agents ready", lambda: ready(c, ["a0", "a1"]))
        c.stop(sig="KILL")
        c.start()
        # The restarted coordinator recovered them from its store; their old
        # epochs are refused, so they register again by themselves.
        wait_for("agents registered again", lambda: all(
            "reregistering" in a.read_log() for a in agents), timeout=10)
        assert ready(c, ["a0", "a1"])
    finally:
        for a in agents:
            a.close()
        c.close()


def test_a_stalled_coordinator_keeps_its_live_nodes():
    """The coordinator is stopped for three times dead-after (SIGSTOP: a
    paused VM, a CPU quota) while one agent is killed: on SIGCONT it does
    not declare the live nodes dead (it could not hear them), it counts the
    stall, and it declares the killed one dead within dead-after."""
    import os
    import signal
    c = Coordinator(heartbeat="200ms", **{"dead-after": "1s"})
    agents = []
    try:
        c.stub.RegisterModel(MODEL, timeout=5)
        agents = [Agent(c, "a%d" % i, "tiny", host_pool="8MiB") for i in range(2)]
        wait_for("agents ready", lambda: ready(c, ["a0", "a1"]))
        for i in range(2):
            c.stub.CreateSequence(pb.CreateSequenceRequest(
                model_id="tiny", sequence_id="s%d" % i, home_node="a%d" % i), timeout=5)
            c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="s%d" % i, tokens=32),
                                  timeout=5)
        os.kill(c.proc.pid, signal.SIGSTOP)
        try:
            agents[1].stop(sig="KILL")
            time.sleep(3)
        finally:
            os.kill(c.proc.pid, signal.SIGCONT)
        resumed = time.time()
        wait_for("a1 dead", lambda: nodes(c)["a1"].state == pb.NODE_DEAD, timeout=5)
        assert time.time() - resumed < 1 + 0.5, time.time() - resumed
        for _ in range(10):  # and a0 stays alive, well past dead-after
            assert nodes(c)["a0"].state == pb.NODE_READY
            time.sleep(0.2)
        get = c.stub.GetSequence
        assert not get(pb.GetSequenceRequest(sequence_id="s0"), timeout=5).degraded
        assert get(pb.GetSequenceRequest(sequence_id="s1"), timeout=5).degraded
        log = c.read_log()
        assert "event=coordinator_stalled" in log, log[-2000:]
        assert "node=a0 state=dead" not in log and "node=a1 state=dead" in log
    finally:
        for a in agents:
            a.close()
        c.close()


def test_agent_waits_for_its_model_then_stops_cleanly():
    c = Coordinator(heartbeat="200ms", **{"dead-after": "3s"})
    a = None
    try:
        a = Agent(c, "late", "later-model", host_pool="8MiB")
        wait_for("agent waiting", lambda: "waiting_for_model" in a.read_log())
        assert "late" not in nodes(c)
        c.stub.RegisterModel(pb.Model(id="later-model", q_heads=2, geometry=pb.BlockGeometry(
            layers=1, kv_heads=1, head_dim=64, block_tokens=16, dtype=pb.KV_DTYPE_BF16)), timeout=5)
        wait_for("late agent ready", lambda: ready(c, ["late"]))
        assert a.stop() == 0
        log = a.read_log()
        assert "stopping" in log and "stopped" in log, log
    finally:
        if a:
            a.close()
        c.close()


def test_bad_agent_configuration_is_refused_clearly():
    import os
    import subprocess
    from kvmesh_testlib import BUILD
    p = subprocess.run([os.path.join(BUILD, "bin", "kvmesh-agent")], capture_output=True,
                       text=True, timeout=10)
    assert p.returncode == 2 and "--model is required" in p.stderr, p.stderr
    p = subprocess.run([os.path.join(BUILD, "bin", "kvmesh-agent"), "--model=m",
                        "--host-pool=lots"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "host-pool" in p.stderr, p.stderr
    c = Coordinator()
    try:
        c.stub.RegisterModel(MODEL, timeout=5)
        p = subprocess.run([os.path.join(BUILD, "bin", "kvmesh-agent"), "--model=tiny",
                            "--coordinator=127.0.0.1:%d" % c.port, "--host-pool=1K"],
                           capture_output=True, text=True, timeout=10)
        assert p.returncode == 1 and "not one block" in p.stderr, p.stderr
    finally:
        c.close()


if __name__ == "__main__":
    run_tests([test_three_agents_register_with_pools_sized_from_the_model,
               test_agents_register_again_after_a_coordinator_crash,
               test_a_stalled_coordinator_keeps_its_live_nodes,
               test_agent_waits_for_its_model_then_stops_cleanly,
               test_bad_agent_configuration_is_refused_clearly])
