#!/usr/bin/python3
"""Sequences through a real coordinator, driven by a Python gRPC client: new
blocks go to the home node while it has room, then are borrowed from
creditors by link bandwidth within their lending caps; a request too big for
the cluster is refused whole; placements survive a coordinator crash; release
gives the space back; a dead creditor degrades the sequences it held."""
import os
import shutil
import tempfile
import threading
import time

import grpc

from kvmesh_testlib import Coordinator, free_port, kvmesh_pb2 as pb, run_tests
from test_metrics import scrape, value

skipped = []

BT = 16
MODEL = pb.Model(id="m", q_heads=8, geometry=pb.BlockGeometry(
    layers=2, kv_heads=2, head_dim=64, block_tokens=BT, dtype=pb.KV_DTYPE_F16))


def node(i, kind, gbps, blocks=100):
    nic = pb.Nic(name="nic0", kind=kind, speed_gbps=gbps, up=True,
                 rdma_device="" if kind == pb.LINK_TCP else "mlx5_0", rdma_port=1)
    return pb.Node(id="n%d" % i, grpc_address="127.0.0.1:%d" % (7100 + i),
                   data_address="127.0.0.1:%d" % (7200 + i),
                   hardware=pb.Hardware(cores=4, memory_bytes=1 << 34, nics=[nic]),
                   capacity=[pb.TierCapacity(tier=pb.TIER_HOST, total_blocks=blocks,
                                             free_blocks=blocks)])


def cluster_of(c, blocks):
    c.stub.RegisterModel(MODEL, timeout=5)
    epochs = {}
    for i, kind, gbps in [(1, pb.LINK_RDMA_ROCE, 100), (2, pb.LINK_TCP, 25),
                          (3, pb.LINK_RDMA_ROCE, 100)]:
        epochs["n%d" % i] = c.stub.RegisterNode(
            pb.RegisterNodeRequest(node=node(i, kind, gbps, blocks)), timeout=5).epoch
    return epochs


def cluster(c):
    return cluster_of(c, 100)


def books(c):
    return {n.id: (n.lent_blocks, n.borrowed_blocks)
            for n in c.stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes}


def where(blocks):
    out = {}
    for b in blocks:
        out[b.node_id] = out.get(b.node_id, 0) + 1
    return out


def test_home_then_creditors_by_bandwidth_within_caps():
    c = Coordinator(**{"dead-after": "60s"})
    try:
        cluster(c)
        s = c.stub.CreateSequence(pb.CreateSequenceRequest(
            model_id="m", sequence_id="a", home_node="n1",
            prompt_tokens=list(range(80 * BT))), timeout=5)
        assert s.home_node == "n1" and s.tokens == 80 * BT and where(s.blocks) == {"n1": 80}
        assert [b.index for b in s.blocks] == list(range(80))
        # 60 more: 20 fit at home, 40 are borrowed from n3 (RDMA, 100 Gbit/s) before n2 (TCP).
        e = c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="a", tokens=60 * BT),
                                  timeout=5)
        assert where(e.new_blocks) == {"n1": 20, "n3": 40}, where(e.new_blocks)
        assert all(b.borrowed == (b.node_id != "n1") for b in e.new_blocks)
        assert e.new_blocks[-1].data_address == "127.0.0.1:7203"
        assert books(c) == {"n1": (0, 40), "n2": (0, 0), "n3": (40, 0)}, books(c)
        # n3 lends at most 50 (half its pool): 10 more there, the rest from n2.
        e = c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="a", tokens=30 * BT - 5),
                                  timeout=5)
        assert where(e.new_blocks) == {"n3": 10, "n2": 20}, where(e.new_blocks)
        assert e.new_blocks[-1].tokens == BT - 5
        # The reply's sequence leaves its blocks out; GetSequence has them.
        assert e.sequence.block_count == 170 and not e.sequence.blocks
        assert e.sequence.tokens == 170 * BT - 5 and e.sequence.home_node == "n1"
        g = c.stub.GetSequence(pb.GetSequenceRequest(sequence_id="a"), timeout=5)
        assert [b.index for b in g.blocks] == list(range(170))
        assert [b.tokens for b in g.blocks] == [BT] * 169 + [BT - 5]
        # n2 can lend 30 more; 31 blocks are refused whole and nothing moves.
        before = books(c)
        try:
            c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="a", tokens=31 * BT + 5),
                                  timeout=5)
            raise AssertionError("should not fit")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert "no room" in err.details(), err.details()
        assert books(c) == before
        g = c.stub.GetSequence(pb.GetSequenceRequest(sequence_id="a"), timeout=5)
        assert len(g.blocks) == 170 and g.tokens == 170 * BT - 5
        import os
        import subprocess
        from kvmesh_testlib import BUILD
        p = subprocess.run([os.path.join(BUILD, "bin", "kvmeshctl"),
                            "--coordinator=127.0.0.1:%d" % c.port, "seq", "a"],
                           capture_output=True, text=True, timeout=20)
        assert p.returncode == 0 and "home n1" in p.stdout and "block 169 on n2 borrowed" in \
            p.stdout, p.stdout
        # The list: table and JSON through kvmeshctl, paging through the API.
        c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="b"), timeout=5)
        ctl = [os.path.join(BUILD, "bin", "kvmeshctl"), "--coordinator=127.0.0.1:%d" % c.port]
        p = subprocess.run(ctl + ["sequences"], capture_output=True, text=True, timeout=20)
        rows = [line.split() for line in p.stdout.splitlines()[1:]]
        assert p.returncode == 0 and [r[0] for r in rows] == ["a", "b"], p.stdout
        assert rows[0][1:6] == ["m", "n1", str(170 * BT - 5), "170", "0"], rows
        import json
        p = subprocess.run(ctl + ["-o", "json", "sequences", "m"], capture_output=True, text=True,
                           timeout=20)
        js = json.loads(p.stdout)
        assert [x["id"] for x in js] == ["a", "b"] and js[0]["blocks"] == 170, js
        p = subprocess.run(ctl + ["sequences", "no-such-model"], capture_output=True, text=True,
                           timeout=20)
        assert p.returncode == 0 and len(p.stdout.splitlines()) == 1, p.stdout
        p = subprocess.run(ctl + ["-o", "json", "seq", "a"], capture_output=True, text=True,
                           timeout=20)
        one = json.loads(p.stdout)
        assert one["home"] == "n1" and len(one["blocks"]) == 170 and one["blocks"][169]["borrowed"]
        assert one["home_epoch"] == 1, one["home_epoch"]
        page = c.stub.ListSequences(pb.ListSequencesRequest(limit=1), timeout=5)
        assert [x.id for x in page.sequences] == ["a"] and page.more and not page.sequences[0].blocks
        page = c.stub.ListSequences(pb.ListSequencesRequest(limit=1, after="a"), timeout=5)
        assert [x.id for x in page.sequences] == ["b"] and not page.more
        c.stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="b"), timeout=5)
        # A crash loses nothing: placements and the ledger's books come back.
        c.stop(sig="KILL")
        c.start()
        g2 = c.stub.GetSequence(pb.GetSequenceRequest(sequence_id="a"), timeout=5)
        assert g2 == g
        assert books(c) == {"n1": (0, 70), "n2": (20, 0), "n3": (50, 0)}, books(c)
        # Release gives everything back.
        r = c.stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="a"), timeout=5)
        assert r.freed_blocks == 170
        assert books(c) == {"n1": (0, 0), "n2": (0, 0), "n3": (0, 0)}
        # And a new sequence may use it all again, home picked by free space.
        s = c.stub.CreateSequence(pb.CreateSequenceRequest(
            model_id="m", prompt_tokens=list(range(50 * BT))), timeout=5)
        assert s.id and len(s.blocks) == 50 and len(where(s.blocks)) == 1
    finally:
        c.close()


def test_dead_creditor_degrades_its_sequences():
    c = Coordinator(heartbeat="100ms", **{"dead-after": "800ms"})
    stop = threading.Event()
    try:
        epochs = cluster(c)

        def beat():  # n1 and n2 stay alive; n3 falls silent
            while not stop.is_set():
                for n in ("n1", "n2"):
                    try:
                        c.stub.Heartbeat(pb.HeartbeatRequest(node_id=n, epoch=epochs[n]),
                                         timeout=2)
                    except grpc.RpcError:
                        pass
                time.sleep(0.1)
        t = threading.Thread(target=beat)
        t.start()
        events = c.stub.WatchEvents(pb.WatchEventsRequest(), timeout=15)
        # 100 blocks fill n1; the 20 of an extend are borrowed from n3, and
        # stored in an extension record (the whole record holds 100).
        c.stub.CreateSequence(pb.CreateSequenceRequest(
            model_id="m", sequence_id="b", home_node="n1", prompt_tokens=list(range(100 * BT))),
            timeout=5)
        e = c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="b", tokens=20 * BT),
                                  timeout=5)
        on_n3 = sorted(b.index for b in e.new_blocks if b.node_id == "n3")
        assert on_n3 == list(range(100, 120)), where(e.new_blocks)
        for ev in events:
            if ev.HasField("sequence") and ev.sequence.kind == pb.SequenceEvent.DEGRADED:
                assert ev.sequence.sequence_id == "b"
                assert sorted(ev.sequence.lost_blocks) == on_n3
                assert "n3" in ev.sequence.reason
                break
        events.cancel()
        g = c.stub.GetSequence(pb.GetSequenceRequest(sequence_id="b"), timeout=5)
        assert g.degraded
        [listed] = c.stub.ListSequences(pb.ListSequencesRequest(), timeout=5).sequences
        assert listed.degraded and listed.block_count == 120, listed
        try:
            c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="b", tokens=1), timeout=5)
            raise AssertionError("a degraded sequence must not grow")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "degraded" in err.details()
    finally:
        stop.set()
        c.close()


def test_a_long_sequence_extends_at_the_cost_of_what_it_adds():
    """Each extend of a long sequence costs what it adds, in the log too
    (extension records, compacted now and then), and a crash loses none."""
    metrics = free_port()
    c = Coordinator(**{"dead-after": "1h", "metrics-listen": "127.0.0.1:%d" % metrics})
    try:
        cluster_of(c, 100000)
        records = value(scrape(metrics), "kvmesh_state_records")
        c.stub.CreateSequence(pb.CreateSequenceRequest(
            model_id="m", sequence_id="long", home_node="n1", prompt_tokens=[5]), timeout=5)
        log0 = value(scrape(metrics), "kvmesh_state_log_bytes")
        n = 600
        for i in range(1, n + 1):
            e = c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="long", tokens=BT),
                                      timeout=5)
            assert [b.index for b in e.new_blocks] == [i], e.new_blocks
            assert e.sequence.block_count == i + 1 and e.sequence.tokens == i * BT + 1
        m = scrape(metrics)
        assert value(m, "kvmesh_state_snapshots_total") == 0
        logged = value(m, "kvmesh_state_log_bytes") - log0
        # Whole records each time would be ~27 bytes x 600^2 / 2 = 4.9 MB.
        assert logged < 300 * 1024, "%d bytes logged for %d extends" % (logged, n)
        g = c.stub.GetSequence(pb.GetSequenceRequest(sequence_id="long"), timeout=5)
        assert [b.index for b in g.blocks] == list(range(n + 1))
        assert [b.tokens for b in g.blocks] == [BT] * n + [1]
        view = [(b.index, b.node_id, b.tokens, b.borrowed) for b in g.blocks]
        used = sum(v for (k, _), v in m.items() if k == "kvmesh_node_used_blocks")
        assert used == n + 1, used

        c.stop("KILL")  # recovery merges the extension records
        c.start()
        g = c.stub.GetSequence(pb.GetSequenceRequest(sequence_id="long"), timeout=5)
        assert [(b.index, b.node_id, b.tokens, b.borrowed) for b in g.blocks] == view
        [listed] = c.stub.ListSequences(pb.ListSequencesRequest(), timeout=5).sequences
        assert listed.block_count == n + 1 and listed.tokens == n * BT + 1, listed
        m = scrape(metrics)
        assert sum(v for (k, _), v in m.items() if k == "kvmesh_node_used_blocks") == n + 1
        c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="long", tokens=BT), timeout=5)
        c.stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="long"), timeout=5)
        c.stop()
        c.start()
        m = scrape(metrics)
        assert value(m, "kvmesh_state_records") == records, "no record of it is left"
        assert sum(v for (k, _), v in m.items() if k == "kvmesh_node_used_blocks") == 0
    finally:
        c.close()


def test_bad_sequence_requests_are_clear_and_change_nothing():
    c = Coordinator(**{"dead-after": "60s"})
    try:
        cluster(c)

        def refused(code, fn, req, contains):
            try:
                fn(req, timeout=5)
            except grpc.RpcError as err:
                assert err.code() == code, (err.code(), err.details())
                assert contains in err.details(), err.details()
                return
            raise AssertionError("accepted: %s" % req)
        refused(grpc.StatusCode.NOT_FOUND, c.stub.CreateSequence,
                pb.CreateSequenceRequest(model_id="nope"), "nope")
        refused(grpc.StatusCode.INVALID_ARGUMENT, c.stub.CreateSequence,
                pb.CreateSequenceRequest(model_id="m", sequence_id="bad id"), "sequence_id")
        refused(grpc.StatusCode.NOT_FOUND, c.stub.CreateSequence,
                pb.CreateSequenceRequest(model_id="m", home_node="ghost"), "ghost")
        c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="x"), timeout=5)
        refused(grpc.StatusCode.ALREADY_EXISTS, c.stub.CreateSequence,
                pb.CreateSequenceRequest(model_id="m", sequence_id="x"), "exists")
        refused(grpc.StatusCode.INVALID_ARGUMENT, c.stub.ExtendSequence,
                pb.ExtendSequenceRequest(sequence_id="x", tokens=0), "tokens")
        refused(grpc.StatusCode.INVALID_ARGUMENT, c.stub.ExtendSequence,
                pb.ExtendSequenceRequest(sequence_id="x", tokens=4000000000), "tokens")
        refused(grpc.StatusCode.NOT_FOUND, c.stub.ExtendSequence,
                pb.ExtendSequenceRequest(sequence_id="y", tokens=1), "y")
        refused(grpc.StatusCode.RESOURCE_EXHAUSTED, c.stub.CreateSequence,
                pb.CreateSequenceRequest(model_id="m", sequence_id="huge",
                                         prompt_tokens=list(range(1000 * BT))), "no room")
        refused(grpc.StatusCode.NOT_FOUND, c.stub.ReleaseSequence,
                pb.ReleaseSequenceRequest(sequence_id="huge"), "huge")
        assert books(c) == {"n1": (0, 0), "n2": (0, 0), "n3": (0, 0)}
    finally:
        c.close()


def acknowledged_changes_survive_a_crash_under_load(data_dir=None):
    """Every change the coordinator acknowledged is kept: clients create,
    extend and release sequences from several threads while the coordinator
    is killed; after a restart each acknowledged create and extend is there
    and each acknowledged release stays done."""
    c = Coordinator(data_dir=data_dir, **{"dead-after": "60s"})
    try:
        c.stub.RegisterModel(MODEL, timeout=5)
        for i in range(1, 4):
            c.stub.RegisterNode(pb.RegisterNodeRequest(
                node=node(i, pb.LINK_TCP, 25, blocks=1 << 20)), timeout=5)
        lock = threading.Lock()
        created, extended, releasing, released = {}, {}, set(), set()
        stop = threading.Event()

        def client(t):
            n = 0
            while not stop.is_set():
                sid = "t%d-%d" % (t, n)
                try:
                    s = c.stub.CreateSequence(pb.CreateSequenceRequest(
                        model_id="m", sequence_id=sid, prompt_tokens=list(range(BT))),
                        timeout=5)
                    with lock:
                        created[sid] = s.tokens
                    if n % 2 == 0:
                        e = c.stub.ExtendSequence(pb.ExtendSequenceRequest(
                            sequence_id=sid, tokens=3 * BT), timeout=5)
                        with lock:
                            extended[sid] = e.sequence.tokens
                    if n % 3 == 0:
                        with lock:  # from here it may be gone, acknowledged or not
                            releasing.add(sid)
                        c.stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=sid),
                                               timeout=5)
                        with lock:
                            released.add(sid)
                except (grpc.RpcError, ValueError):  # ValueError: its channel closed
                    return  # the coordinator is gone: what was acknowledged counts
                n += 1

        threads = [threading.Thread(target=client, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        c.stop("KILL")  # mid-stream: calls in flight are never acknowledged
        stop.set()
        for t in threads:
            t.join()
        assert len(created) > 50, "too few calls to mean much: %d" % len(created)
        c.start()
        for sid, tokens in created.items():
            try:
                g = c.stub.GetSequence(pb.GetSequenceRequest(sequence_id=sid), timeout=5)
            except grpc.RpcError as err:
                assert sid in releasing and err.code() == grpc.StatusCode.NOT_FOUND, \
                    "%s was acknowledged, then lost: %s" % (sid, err.details())
                continue
            assert sid not in released, "%s was released, and came back" % sid
            assert g.tokens >= extended.get(sid, tokens), (sid, g.tokens, extended.get(sid))
    finally:
        c.close()


def test_acknowledged_changes_survive_a_crash_under_load():
    """On disk: acknowledgements come from the committer, many per fdatasync."""
    acknowledged_changes_survive_a_crash_under_load()


def test_acknowledged_changes_survive_a_crash_on_quick_syncs():
    """On tmpfs, where a sync takes microseconds: the handlers' threads sync
    themselves (a process killed keeps what it wrote there)."""
    if not os.access("/dev/shm", os.W_OK):
        skipped.append("no writable /dev/shm (tmpfs) on this machine")
        return
    d = tempfile.mkdtemp(prefix="kvmesh-coord-", dir="/dev/shm")
    try:
        acknowledged_changes_survive_a_crash_under_load(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    run_tests([test_home_then_creditors_by_bandwidth_within_caps,
               test_dead_creditor_degrades_its_sequences,
               test_a_long_sequence_extends_at_the_cost_of_what_it_adds,
               test_bad_sequence_requests_are_clear_and_change_nothing,
               test_acknowledged_changes_survive_a_crash_under_load,
               test_acknowledged_changes_survive_a_crash_on_quick_syncs], skipped)
