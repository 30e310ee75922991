#!/usr/bin/python3
"""The coordinator's disk: when it is full, new state is refused with a clear
error and nothing else changes, while releases and registrations go on, and
writes resume once there is space; when a write fails after a change was
applied, the coordinator stops (exit 74) and a restart recovers exactly what
was acknowledged. A full disk is the file-size limit (RLIMIT_FSIZE): writes
past it fail with EFBIG as they fail with ENOSPC on a full disk, without
root."""
import time

import grpc

from kvmesh_testlib import Coordinator, free_port, kvmesh_pb2 as pb, run_tests
from test_coordinator import expect_error
from test_metrics import scrape, value
from test_sequences import MODEL, BT, node

skipped = []

MiB = 1 << 20
BLOCKS = 1000  # per sequence: a ~40 KiB record, so the log fills in a few dozen


def big_cluster(c, blocks):
    c.stub.RegisterModel(MODEL, timeout=5)
    for i in (1, 2, 3):
        c.stub.RegisterNode(pb.RegisterNodeRequest(
            node=node(i, pb.LINK_RDMA_ROCE, 100, blocks=blocks)), timeout=5)


def create(c, sid):
    """A sequence of one token (one block): a small record."""
    return c.stub.CreateSequence(pb.CreateSequenceRequest(
        sequence_id=sid, model_id="m", home_node="n1", prompt_tokens=[7]), timeout=10)


def grow(c, sid, blocks):
    """Extends sid to `blocks` blocks: its record grows to ~35 bytes a block."""
    return c.stub.ExtendSequence(pb.ExtendSequenceRequest(
        sequence_id=sid, tokens=blocks * BT - 1), timeout=30)


def no_room(e):
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
    assert "state store" in e.details() and "no room" in e.details(), e.details()


def sequence_ids(c):
    r = c.stub.ListSequences(pb.ListSequencesRequest(), timeout=10)
    return sorted(s.id for s in r.sequences)


def wait_for(what, fn, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting for " + what)


def test_a_full_disk_refuses_new_state_and_loses_nothing():
    metrics = free_port()
    # The log's first 4 MiB of zeros are written at start; the next ones
    # cannot be, so new state is refused once 1 MiB of room is left.
    c = Coordinator(file_size_limit=4 * MiB, **{"metrics-listen": "127.0.0.1:%d" % metrics})
    try:
        big_cluster(c, 100000)
        acked = []
        for i in range(200):
            sid = "s%03d" % i
            create(c, sid)
            acked.append(sid)
            try:
                grow(c, sid, BLOCKS)
            except grpc.RpcError as e:
                no_room(e)
                refused = sid
                break
        else:
            raise AssertionError("200 sequences fitted in the log")
        assert len(acked) * BLOCKS * 35 > 2 * MiB, "refused before the reserve: %d" % len(acked)
        m = scrape(metrics)
        assert value(m, "kvmesh_state_log_full") == 1
        assert value(m, "kvmesh_state_refused_total") == 1
        assert value(m, "kvmesh_state_log_room_bytes") >= MiB
        assert "event=state_log_cannot_grow" in c.read_log()

        # Refused: nothing changed, here or in the books.
        s = c.stub.GetSequence(pb.GetSequenceRequest(sequence_id=refused), timeout=5)
        assert s.tokens == 1 and len(s.blocks) == 1, s
        grown = len(acked) - 1
        for i in range(2000):  # small records still fit, until the reserve
            try:
                create(c, "x%04d" % i)
                acked.append("x%04d" % i)
            except grpc.RpcError as e:
                no_room(e)
                refused_create = "x%04d" % i
                expect_error(grpc.StatusCode.NOT_FOUND, c.stub.GetSequence,
                             pb.GetSequenceRequest(sequence_id=refused_create),
                             contains=refused_create)
                break
        else:
            raise AssertionError("creates were taken in the reserve")
        assert sequence_ids(c) == acked
        m = scrape(metrics)
        used = sum(v for (name, _), v in m.items() if name == "kvmesh_node_used_blocks")
        assert used == grown * BLOCKS + len(acked) - grown, (used, len(acked))
        assert value(m, "kvmesh_state_refused_total") == 2

        # Releases, a new node's registration and a cordon go on.
        for sid in acked[:2]:
            c.stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=sid), timeout=5)
        released, acked = acked[:2], acked[2:]
        c.stub.RegisterNode(pb.RegisterNodeRequest(
            node=node(4, pb.LINK_TCP, 25, blocks=100000)), timeout=5)
        c.stub.CordonNode(pb.NodeRequest(node_id="n4"), timeout=5)

        # Space again: creates are taken within a few seconds, unrestarted.
        c.lift_limit()

        def created():
            try:
                create(c, "after")
                return True
            except grpc.RpcError as e:
                no_room(e)
                return False
        wait_for("a create once there is space", created)
        acked.append("after")
        assert value(scrape(metrics), "kvmesh_state_log_full") == 0
        assert "event=state_log_can_grow" in c.read_log()

        # A restart recovers what was acknowledged, and only that.
        assert c.stop() == 0
        c.start()
        assert sequence_ids(c) == sorted(acked)
        for sid in released + [refused_create]:
            expect_error(grpc.StatusCode.NOT_FOUND, c.stub.GetSequence,
                         pb.GetSequenceRequest(sequence_id=sid), contains=sid)
        s = c.stub.GetSequence(pb.GetSequenceRequest(sequence_id=refused), timeout=5)
        assert s.tokens == 1 and len(s.blocks) == 1, "the refused extend is not there"
        nodes = {n.id: n for n in c.stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes}
        assert nodes["n4"].state == pb.NODE_CORDONED, nodes["n4"]
    finally:
        c.close()


def test_a_failed_state_write_stops_the_coordinator_and_loses_nothing():
    # Room for the first 4 MiB of zeros, no more: a sequence whose record is
    # bigger makes the log's writer extend the file itself, after the record
    # was applied, and that write fails.
    c = Coordinator(file_size_limit=4 * MiB + 64 * 1024)
    try:
        big_cluster(c, 300000)
        for i in range(3):
            create(c, "s%d" % i)
            grow(c, "s%d" % i, 10)
        try:
            grow(c, "s2", 200000)
            raise AssertionError("a 4 MiB record was written past the limit")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
            assert "state store failed" in e.details(), e.details()
            assert "restarting" in e.details(), e.details()
        assert c.proc.wait(timeout=15) == 74, "EX_IOERR, for the supervisor to restart it"
        assert "event=state_store_failed" in c.read_log()

        c.file_size_limit = None
        c.start()
        assert sequence_ids(c) == ["s0", "s1", "s2"]
        s = c.stub.GetSequence(pb.GetSequenceRequest(sequence_id="s2"), timeout=5)
        assert len(s.blocks) == 10, "the failed extend is not there"
        c.stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="s0"), timeout=5)
        create(c, "s3")
        assert sequence_ids(c) == ["s1", "s2", "s3"]
    finally:
        c.close()


if __name__ == "__main__":
    run_tests([test_a_full_disk_refuses_new_state_and_loses_nothing,
               test_a_failed_state_write_stops_the_coordinator_and_loses_nothing], skipped)
