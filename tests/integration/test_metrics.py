#!/usr/bin/python3
"""The daemons' /metrics and /healthz (--metrics-listen): Prometheus's own
tools read them (promtool checks the text; a real Prometheus server scrapes
a live cluster), the figures follow what the cluster does, bad input is
counted, and a bad address or a taken port stops the daemon with a clear
error."""
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc

from kvmesh_testlib import (BUILD, ROOT, Agent, Coordinator, free_port, kvmesh_pb2,
                            kvmesh_pb2_grpc, list_nodes, run_tests, wait_for)

skipped = []
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def get(port, path, method="GET"):
    """(status, content type, body) of an HTTP request to the endpoint."""
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def scrape(port):
    """{(name, frozenset of label pairs): value} of one scrape."""
    status, ctype, body = get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
    out = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, "not a sample line: %r" % line
        labels = frozenset(LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(samples, name, **labels):
    """The one sample of name whose labels include these (0 if none)."""
    want = set(labels.items())
    hits = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert len(hits) <= 1, (name, labels, hits)
    return hits[0] if hits else 0.0


def handled(samples, method, code):
    return value(samples, "grpc_server_handled_total", grpc_method=method, grpc_code=code)


def with_metrics(cls, *args, **flags):
    port = free_port()
    flags["metrics-listen"] = "127.0.0.1:%d" % port
    d = cls(*args, **flags)
    d.metrics_port = port
    return d


def model(mid="m"):
    return kvmesh_pb2.Model(id=mid, q_heads=4, geometry=kvmesh_pb2.BlockGeometry(
        layers=2, kv_heads=2, head_dim=64, block_tokens=16, dtype=kvmesh_pb2.KV_DTYPE_F16))


@contextlib.contextmanager
def one_agent(**agent_flags):
    """A coordinator and one agent n0 of model "m", both with /metrics."""
    c = with_metrics(Coordinator)
    a = None
    try:
        c.stub.RegisterModel(model(), timeout=5)
        a = with_metrics(Agent, c, "n0", "m", **agent_flags)
        wait_for("agent ready", lambda: "n0" in list_nodes(c))
        yield c, a
    finally:
        if a:
            a.close()
        c.close()


def test_endpoint_answers_health_and_refuses_other_requests():
    c = with_metrics(Coordinator)
    try:
        status, ctype, body = get(c.metrics_port, "/healthz")
        assert (status, body) == (200, "ok\n"), (status, body)
        status, _, body = get(c.metrics_port, "/nothing-here")
        assert status == 404 and "/metrics" in body, (status, body)
        status, _, _ = get(c.metrics_port, "/metrics", method="POST")
        assert status == 405, status
        status, _, _ = get(c.metrics_port, "/metrics", method="HEAD")
        assert status == 200, status
        assert "metrics_port=%d" % c.metrics_port in c.read_log()
    finally:
        c.close()


def test_promtool_accepts_both_daemons_metrics():
    if not PROMTOOL:
        skipped.append("promtool not installed (Debian package prometheus; deploy/deps.sh)")
        return
    with one_agent() as (c, a):
        for port in (c.metrics_port, a.metrics_port):
            _, _, body = get(port, "/metrics")
            r = subprocess.run([PROMTOOL, "check", "metrics"], input=body, text=True,
                               capture_output=True, timeout=30)
            # Exit 0 and no lint complaint (promtool lists them on stdout or stderr).
            assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), \
                (port, r.stdout, r.stderr)


def test_alert_rules_name_only_exported_metrics():
    """deploy/prometheus/kvmesh-rules.yaml must not drift from the code: every
    metric its expressions name is in a live coordinator's or agent's scrape."""
    import yaml
    with open(os.path.join(ROOT, "deploy", "prometheus", "kvmesh-rules.yaml")) as f:
        rules = [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
    named = set()
    for r in rules:
        named |= set(re.findall(r"\b((?:kvmesh|grpc_server)_[a-z_]+)", r["expr"]))
    assert len(named) >= 8, named
    with one_agent() as (c, a):
        exported = {n for n, _ in scrape(c.metrics_port)} | {n for n, _ in scrape(a.metrics_port)}
        assert named <= exported, named - exported


def test_calls_and_bad_input_are_counted():
    c = with_metrics(Coordinator)
    try:
        before = scrape(c.metrics_port)
        c.stub.RegisterModel(model(), timeout=5)
        # Bad input: shapes that do not divide, an unknown model, an absurd size.
        bad = model("bad")
        bad.q_heads = 3  # not a multiple of kv_heads
        for call, req in ((c.stub.RegisterModel, bad),
                          (c.stub.CreateSequence,
                           kvmesh_pb2.CreateSequenceRequest(model_id="nope", home_node="x")),
                          (c.stub.ExtendSequence,
                           kvmesh_pb2.ExtendSequenceRequest(sequence_id="nope",
                                                            tokens=0xFFFFFFFF))):
            try:
                call(req, timeout=5)
                raise AssertionError("bad input accepted: %s" % req)
            except grpc.RpcError:
                pass
        # A method the server does not have.
        try:
            c.channel.unary_unary("/kvmesh.v1.Coordinator/NoSuchMethod")(b"", timeout=5)
            raise AssertionError("unknown method answered")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNIMPLEMENTED, e
        after = scrape(c.metrics_port)
        for method, code in (("RegisterModel", "OK"), ("RegisterModel", "InvalidArgument")):
            assert handled(after, method, code) - handled(before, method, code) == 1, \
                (method, code, handled(after, method, code))
        bad_codes = ("InvalidArgument", "NotFound", "FailedPrecondition", "OutOfRange")
        for method in ("CreateSequence", "ExtendSequence"):
            n = sum(handled(after, method, k) - handled(before, method, k) for k in bad_codes)
            assert n == 1, (method, n)
            assert value(after, "grpc_server_started_total", grpc_method=method) - \
                value(before, "grpc_server_started_total", grpc_method=method) == 1
        count = value(after, "grpc_server_handling_seconds_count", grpc_method="RegisterModel")
        inf = value(after, "grpc_server_handling_seconds_bucket", grpc_method="RegisterModel",
                    le="+Inf")
        assert count == inf == 2, (count, inf)
        assert value(after, "kvmesh_rpc_unknown_method_total") - \
            value(before, "kvmesh_rpc_unknown_method_total") == 1
    finally:
        c.close()


def test_cluster_figures_follow_borrowing_and_a_dead_node():
    bt, pool_blocks = 16, 8
    c = with_metrics(Coordinator, **{"dead-after": "1500ms", "heartbeat": "300ms"})
    agents = []
    try:
        c.stub.RegisterModel(model(), timeout=5)
        block_bytes = 2 * 2 * bt * 2 * 64 * 2  # layers, k|v, tokens, kv heads, dim, fp16
        for i in range(3):
            agents.append(with_metrics(Agent, c, "n%d" % i, "m",
                                       host_pool=str(block_bytes * pool_blocks),
                                       **{"tail-reserve": "2"}))
        wait_for("agents ready", lambda: len([
            n for n in list_nodes(c).values() if n.state == kvmesh_pb2.NODE_READY]) == 3)
        s = scrape(c.metrics_port)
        assert value(s, "kvmesh_nodes", state="ready") == 3, s
        # n0's own pool holds 6 blocks (8 less the tail reserve): 10 more are borrowed.
        c.stub.CreateSequence(kvmesh_pb2.CreateSequenceRequest(
            sequence_id="s1", model_id="m", home_node="n0"), timeout=5)
        c.stub.ExtendSequence(kvmesh_pb2.ExtendSequenceRequest(
            sequence_id="s1", tokens=10 * bt), timeout=5)
        nodes = list_nodes(c)
        s = scrape(c.metrics_port)
        lent = {n: value(s, "kvmesh_node_lent_blocks", node=n) for n in nodes}
        assert value(s, "kvmesh_node_borrowed_blocks", node="n0") == sum(lent.values()) > 0, \
            (lent, s)
        assert value(s, "kvmesh_sequences") == 1
        for n, nd in nodes.items():
            host = [t for t in nd.capacity if t.tier == kvmesh_pb2.TIER_HOST][0]
            assert value(s, "kvmesh_node_pool_blocks", node=n) == host.total_blocks, n
            # The agent's own figure is what it offers the ledger.
            a = scrape(agents[int(n[1])].metrics_port)
            assert value(a, "kvmesh_agent_pool_blocks", state="total") == host.total_blocks, n
        # Agents took heartbeats and block reports: the calls are counted there.
        assert handled(s, "RegisterNode", "OK") == 3 and handled(s, "ReportBlocks", "OK") >= 3
        wait_for("heartbeats counted",
                 lambda: handled(scrape(c.metrics_port), "Heartbeat", "OK") >= 3)

        # A decode step on the home: one attention query, timed.
        home = scrape(agents[0].metrics_port)
        ch = grpc.insecure_channel("127.0.0.1:%d" % agents[0].port)
        kvmesh_pb2_grpc.AgentStub(ch).AttendAppend(kvmesh_pb2.AttendAppendRequest(
            model_id="m", layer=0, queries=[kvmesh_pb2.AttendQuery(
                sequence_id="s1", q=[0.5] * (4 * 64), k_new=bytes(2 * 64 * 2),
                v_new=bytes(2 * 64 * 2))]), timeout=10)
        ch.close()
        after = scrape(agents[0].metrics_port)
        for name in ("kvmesh_agent_attend_queries_total", "kvmesh_agent_attend_seconds_count"):
            assert value(after, name) - value(home, name) == 1, (name, value(after, name))
        assert value(after, "kvmesh_agent_attend_failed_total") == 0
        assert handled(after, "AttendAppend", "OK") == 1

        # A creditor dies: the node shows dead and the sequence degraded.
        creditor = [n for n, v in lent.items() if v > 0][0]
        agents[int(creditor[1])].stop("KILL")
        wait_for("dead node in /metrics",
                 lambda: value(scrape(c.metrics_port), "kvmesh_nodes", state="dead") == 1)
        s = scrape(c.metrics_port)
        assert value(s, "kvmesh_nodes", state="ready") == 2
        assert value(s, "kvmesh_sequences_degraded_total") == 1, s
        # The other creditor's agent crashes and comes back at once: counted.
        other = ({"n1", "n2"} - {creditor}).pop()
        assert value(s, "kvmesh_node_restarts_total", node=other) == 0
        agents[int(other[1])].stop("KILL")
        agents[int(other[1])].start()
        wait_for("the restart counted", lambda: value(
            scrape(c.metrics_port), "kvmesh_node_restarts_total", node=other) == 1)
        assert value(scrape(c.metrics_port), "kvmesh_nodes", state="ready") == 2
    finally:
        for a in agents:
            a.close()
        c.close()


def test_draining_agent_says_unhealthy_until_it_exits():
    """SIGTERM: while the agent waits for the sequences homed on it, /healthz
    answers 503 (take it out of rotation) and /metrics still answers; once
    the last one is released it exits 0. (With no other agent, nothing can
    take the sequence over.)"""
    with one_agent(**{"drain-timeout": "20s"}) as (c, a):
        assert get(a.metrics_port, "/healthz")[0] == 200
        c.stub.CreateSequence(kvmesh_pb2.CreateSequenceRequest(
            sequence_id="held", model_id="m", home_node="n0"), timeout=5)
        a.proc.terminate()
        wait_for("agent draining", lambda: list_nodes(c)["n0"].state == kvmesh_pb2.NODE_DRAINING)
        status, _, body = get(a.metrics_port, "/healthz")
        assert status == 503, (status, body)
        assert value(scrape(a.metrics_port), "kvmesh_agent_pool_blocks", state="total") > 0
        assert a.proc.poll() is None, "left before its home sequence was released"
        c.stub.ReleaseSequence(kvmesh_pb2.ReleaseSequenceRequest(sequence_id="held"), timeout=5)
        assert a.proc.wait(timeout=15) == 0
        assert 'result="drained"' in a.read_log(), a.read_log()[-2000:]


def test_prometheus_scrapes_a_live_cluster():
    if not PROMETHEUS:
        skipped.append("prometheus not installed (Debian package prometheus; deploy/deps.sh)")
        return
    prom = log = None
    d = tempfile.mkdtemp(prefix="kvmesh-prom-")
    try:
        with one_agent() as (c, a):
            with open(os.path.join(d, "prometheus.yml"), "w") as f:
                f.write("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                        "scrape_configs:\n"
                        "  - job_name: kvmesh\n"
                        "    static_configs:\n"
                        "      - targets: ['127.0.0.1:%d', '127.0.0.1:%d']\n"
                        % (c.metrics_port, a.metrics_port))
            web = free_port()
            log = open(os.path.join(d, "prometheus.log"), "wb")
            prom = subprocess.Popen([PROMETHEUS, "--config.file=" + os.path.join(d, "prometheus.yml"),
                                     "--storage.tsdb.path=" + os.path.join(d, "data"),
                                     "--web.listen-address=127.0.0.1:%d" % web],
                                    stdout=log, stderr=subprocess.STDOUT)

            def query(q):
                url = "http://127.0.0.1:%d/api/v1/query?query=%s" % (web, urllib.parse.quote(q))
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        return json.load(r)["data"]["result"]
                except (OSError, ValueError, KeyError):
                    return []

            # Both targets up (Prometheus parsed every scrape), and our figures there.
            wait_for("both targets up", lambda: len(query('up{job="kvmesh"} == 1')) == 2,
                     timeout=60)
            ready = wait_for("kvmesh_nodes in Prometheus",
                             lambda: query('kvmesh_nodes{state="ready"}'), timeout=30)
            assert float(ready[0]["value"][1]) == 1, ready
            pool = wait_for("agent pool in Prometheus",
                            lambda: query('kvmesh_agent_pool_blocks{state="total"}'), timeout=30)
            assert float(pool[0]["value"][1]) > 0, pool
    finally:
        if prom:
            prom.terminate()
            prom.wait(timeout=30)
        if log:
            log.close()
        shutil.rmtree(d, ignore_errors=True)


def run_daemon(prog, *flags):
    return subprocess.run([os.path.join(BUILD, "bin", prog)] + list(flags),
                          capture_output=True, text=True, timeout=20)


def test_bad_address_or_taken_port_stops_the_daemon_clearly():
    d = tempfile.mkdtemp(prefix="kvmesh-coord-")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        for addr, why in (("no-port-here", "is not host:port"),
                          ("127.0.0.1:%d" % busy.getsockname()[1], "cannot serve on")):
            r = run_daemon("kvmesh-coordinator", "--listen=127.0.0.1:%d" % free_port(),
                           "--data-dir=" + d, "--metrics-listen=" + addr)
            assert r.returncode == 1, (addr, r.returncode, r.stderr)
            assert "metrics_listen_failed" in r.stderr and why in r.stderr, r.stderr
    finally:
        busy.close()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    tests = [test_endpoint_answers_health_and_refuses_other_requests,
             test_promtool_accepts_both_daemons_metrics,
             test_alert_rules_name_only_exported_metrics,
             test_calls_and_bad_input_are_counted,
             test_cluster_figures_follow_borrowing_and_a_dead_node,
             test_draining_agent_says_unhealthy_until_it_exits,
             test_prometheus_scrapes_a_live_cluster,
             test_bad_address_or_taken_port_stops_the_daemon_clearly]
    run_tests(tests, skipped)
