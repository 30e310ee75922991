#!/usr/bin/python3
"""A cluster with a shared token (--auth-token-file), driven by a real Python
gRPC client and by kvmeshctl: calls without the token or with another one
get UNAUTHENTICATED with a message that says so, on the coordinator and on
the agents, unary and streaming; the right token works; the health service
answers without one; token files that group or others may read are refused
at startup with the fix in the message; without a token file the daemons
warn that the cluster is open."""
import os
import shutil
import subprocess
import tempfile

import grpc

from kvmesh_testlib import (BUILD, AgentCluster, Coordinator, channel, free_port, health_pb2,
                            health_pb2_grpc, kvmesh_pb2 as pb, kvmesh_pb2_grpc as pbg, run_tests,
                            write_token_file)

TOKEN = "0f3c9a-shared-cluster-token"
MODEL = pb.Model(id="tiny", q_heads=4, geometry=pb.BlockGeometry(
    layers=2, kv_heads=2, head_dim=32, block_tokens=16, dtype=pb.KV_DTYPE_F16))
INTRUDER = pb.Model(id="intruder", q_heads=4, geometry=MODEL.geometry)
DENIED = "missing or wrong authorization token"


def expect_unauthenticated(fn):
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (e.code(), e.details())
        assert e.details() == DENIED, e.details()
        return
    raise AssertionError("the call went through without the right token")


def serving(target, token=None):
    ch = channel(target, token)
    try:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                 timeout=5)
        return r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        ch.close()


def test_grpc_calls_need_the_token():
    # The agents register and turn ready: their calls carry the token.
    cl = AgentCluster(MODEL, ["4MiB", "4MiB"], token=TOKEN,
                      coordinator_flags={"heartbeat": "200ms"})
    chans = []
    try:
        coord = "127.0.0.1:%d" % cl.c.port
        for tok in (None, "wrong-token", TOKEN + "x", TOKEN[:-1]):
            ch = channel(coord, tok)
            chans.append(ch)
            stub = pbg.CoordinatorStub(ch)
            expect_unauthenticated(lambda: stub.ListNodes(pb.ListNodesRequest(), timeout=5))
            expect_unauthenticated(lambda: stub.RegisterModel(INTRUDER, timeout=5))
            # A server stream is refused before its first message.
            expect_unauthenticated(lambda: list(stub.WatchEvents(pb.WatchEventsRequest(),
                                                                 timeout=5)))
            agent = cl.stub("n0", token=tok or "-")
            if tok is None:
                ach = grpc.insecure_channel("127.0.0.1:%d" % cl.agents["n0"].port)
                chans.append(ach)
                agent = pbg.AgentStub(ach)
            expect_unauthenticated(lambda: agent.Stats(pb.StatsRequest(), timeout=5))
        # The right token: the same calls work.
        ids = sorted(n.id for n in cl.c.stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes)
        assert ids == ["n0", "n1"], ids
        st = cl.stub("n1").Stats(pb.StatsRequest(), timeout=5)
        assert "sequences" in st.counters
        # Health stays open for probes, on the coordinator and the agents.
        assert serving(coord)
        assert serving("127.0.0.1:%d" % cl.agents["n0"].port)
        assert serving(coord, "wrong-token")
        # No handler ran for a refused call: the intruder's model is not there.
        models = cl.c.stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        assert [m.id for m in models] == ["tiny"], models
        # Logs say the daemons run with a token.
        assert "auth=token" in cl.c.read_log()
        assert "auth=token" in cl.agents["n0"].read_log()
    finally:
        for ch in chans:
            ch.close()
        cl.close()


def ctl(coord, *args, env=None):
    e = dict(os.environ)
    e.pop("KVMESH_AUTH_TOKEN_FILE", None)
    e.update(env or {})
    return subprocess.run([os.path.join(BUILD, "bin", "kvmeshctl"), "--coordinator=" + coord]
                          + list(args), capture_output=True, text=True, timeout=30, env=e)


def test_kvmeshctl_with_and_without_the_token():
    c = Coordinator(token=TOKEN)
    wrong = write_token_file("not-the-token")
    try:
        coord = "127.0.0.1:%d" % c.port
        p = ctl(coord, "nodes")
        assert p.returncode == 5, (p.returncode, p.stderr)
        assert DENIED in p.stderr and "--auth-token-file" in p.stderr, p.stderr
        p = ctl(coord, "--auth-token-file=" + wrong, "models")
        assert p.returncode == 5 and DENIED in p.stderr, (p.returncode, p.stderr)
        p = ctl(coord, "--auth-token-file=" + c.token_file, "nodes")
        assert p.returncode == 0, (p.returncode, p.stderr)
        assert p.stdout.startswith("NODE"), p.stdout
        # The environment variable, and a streaming command: watch with the
        # token streams until stopped; without it, it ends at once.
        p = ctl(coord, "models", env={"KVMESH_AUTH_TOKEN_FILE": c.token_file})
        assert p.returncode == 0, (p.returncode, p.stderr)
        e = dict(os.environ, KVMESH_AUTH_TOKEN_FILE=c.token_file)
        w = subprocess.Popen([os.path.join(BUILD, "bin", "kvmeshctl"), "--coordinator=" + coord,
                              "watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e)
        try:
            w.wait(timeout=1.5)
            raise AssertionError("watch ended: %s %s" % (w.returncode, w.stderr.read()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            w.kill()
            w.communicate()
        p = ctl(coord, "watch")
        assert p.returncode == 5 and DENIED in p.stderr, (p.returncode, p.stderr)
        # A token file others may read: refused before any call.
        os.chmod(c.token_file, 0o644)
        p = ctl(coord, "--auth-token-file=" + c.token_file, "nodes")
        assert p.returncode == 2 and "chmod 600" in p.stderr, (p.returncode, p.stderr)
        os.chmod(c.token_file, 0o600)
        p = ctl(coord, "--help")
        assert "--auth-token-file" in p.stdout and "KVMESH_AUTH_TOKEN_FILE" in p.stdout, p.stdout
    finally:
        shutil.rmtree(os.path.dirname(wrong), ignore_errors=True)
        c.close()


def run_daemon(prog, *flags):
    return subprocess.run([os.path.join(BUILD, "bin", prog)] + list(flags), capture_output=True,
                          text=True, timeout=30)


def test_unsafe_or_empty_token_files_refused_at_startup():
    d = tempfile.mkdtemp(prefix="kvmesh-auth-")
    try:
        loose = write_token_file(TOKEN, mode=0o644)
        empty = os.path.join(d, "empty")
        open(empty, "w").close()
        os.chmod(empty, 0o600)
        listen = "--listen=127.0.0.1:%d" % free_port()
        for prog, extra in (("kvmesh-coordinator", ["--data-dir=" + os.path.join(d, "data")]),
                            ("kvmesh-agent", ["--model=tiny", "--coordinator=127.0.0.1:1"])):
            p = run_daemon(prog, listen, "--auth-token-file=" + loose, *extra)
            assert p.returncode == 2, (prog, p.returncode, p.stderr)
            assert "group or others" in p.stderr and "chmod 600 " + loose in p.stderr, p.stderr
            p = run_daemon(prog, listen, "--auth-token-file=" + empty, *extra)
            assert p.returncode == 2 and "is empty" in p.stderr, (prog, p.returncode, p.stderr)
            p = run_daemon(prog, listen, "--auth-token-file=" + os.path.join(d, "none"), *extra)
            assert p.returncode == 2 and "No such file" in p.stderr, (prog, p.returncode, p.stderr)
            p = run_daemon(prog, "--help")
            assert "--auth-token-file" in p.stdout and "KVMESH_AUTH_TOKEN_FILE" in p.stdout
        shutil.rmtree(os.path.dirname(loose), ignore_errors=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_open_cluster_warns_once_and_ignores_tokens():
    c = Coordinator()
    try:
        log = c.read_log()
        assert log.count("event=auth_disabled") == 1, log
        assert "auth=none" in log, log
        # A client that sends a token anyway is served.
        ch = channel("127.0.0.1:%d" % c.port, "some-token")
        pbg.CoordinatorStub(ch).ListNodes(pb.ListNodesRequest(), timeout=5)
        ch.close()
    finally:
        c.close()


if __name__ == "__main__":
    run_tests([test_grpc_calls_need_the_token, test_kvmeshctl_with_and_without_the_token,
               test_unsafe_or_empty_token_files_refused_at_startup,
               test_open_cluster_warns_once_and_ignores_tokens])
