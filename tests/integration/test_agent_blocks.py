#!/usr/bin/python3
"""Agents store full blocks for the cluster (Agent.PutBlocks) where the
coordinator placed them, pin them, report them, and serve them back
(Agent.GetBlocks); bad requests store nothing; released blocks are stale."""
import os

import grpc

from kvmesh_testlib import (AgentCluster, kvmesh_pb2 as pb, list_nodes,
                            run_tests, wait_for)

MODEL = pb.Model(id="tiny", q_heads=4, geometry=pb.BlockGeometry(
    layers=2, kv_heads=2, head_dim=16, block_tokens=8, dtype=pb.KV_DTYPE_F16))
BLOCK_BYTES = 2 * 2 * 8 * 2 * 16 * 2


nodes = list_nodes


def reports_supported(c):
    """Whether the coordinator takes block reports (the coordinator side of
    issue 6); without it GetSequence shows no handles."""
    try:
        c.stub.ReportBlocks(pb.ReportBlocksRequest(node_id="probe", incremental=True,
                                                   last=True), timeout=5)
    except grpc.RpcError as e:
        return e.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


def Cluster(pools, **agent_flags):
    return AgentCluster(MODEL, pools, {"heartbeat": "200ms", "dead-after": "3s"}, **agent_flags)


def block(seed):
    return bytes((seed * 31 + i) & 0xFF for i in range(BLOCK_BYTES))


def test_put_get_blocks_where_the_coordinator_placed_them():
    cl = Cluster(["1MiB", "1MiB"])
    try:
        c = cl.c
        seq = c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="tiny", sequence_id="s1",
                                                             home_node="n0"), timeout=5)
        ext = c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id=seq.id, tokens=8 * 6),
                                    timeout=5)
        by_node = {}
        for p in ext.new_blocks:
            by_node.setdefault(p.node_id, []).append(p.index)
        handles = {}
        for node, idx in by_node.items():
            idx.sort()
            # One call per node; consecutive indexes per call.
            runs, run = [], [idx[0]]
            for i in idx[1:]:
                if i == run[-1] + 1:
                    run.append(i)
                else:
                    runs.append(run)
                    run = [i]
            runs.append(run)
            for run in runs:
                r = cl.stub(node).PutBlocks(pb.PutBlocksRequest(
                    model_id="tiny", sequence_id="s1", first_index=run[0],
                    blocks=[pb.BlockData(data=block(i), key=(b"k%015d" % i) if i < 2 else b"")
                            for i in run]), timeout=5)
                assert len(r.handles) == len(run)
                for i, h in zip(run, r.handles):
                    assert h.tier == pb.TIER_HOST and h.generation % 2 == 1
                    handles[i] = (node, h)
        assert sorted(handles) == list(range(6))
        for i, (node, h) in handles.items():
            g = cl.stub(node).GetBlocks(pb.GetBlocksRequest(handles=[h]), timeout=5)
            assert g.blocks[0].data == block(i), "block %d differs" % i
            assert g.blocks[0].key == ((b"k%015d" % i) if i < 2 else b"")
        # Pinned blocks count as used on the node's Stats.
        st = cl.stub("n0").Stats(pb.StatsRequest(), timeout=5)
        assert st.counters["pinned_blocks"] == len(by_node.get("n0", [])), st
        if reports_supported(c):
            got = c.stub.GetSequence(pb.GetSequenceRequest(sequence_id="s1"), timeout=5)
            for p in got.blocks:
                node, h = handles[p.index]
                assert p.node_id == node and p.handle.slot == h.slot and \
                    p.handle.generation == h.generation, (p, h)
    finally:
        cl.close()


def test_stale_and_unknown_handles_are_not_found():
    cl = Cluster(["1MiB"])
    try:
        s = cl.stub("n0")
        h = pb.BlockHandle(slot=3, generation=77, tier=pb.TIER_HOST)
        try:
            s.GetBlocks(pb.GetBlocksRequest(handles=[h]), timeout=5)
            raise AssertionError("a handle never given out was served")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
            assert "slot 3 generation 77" in e.details(), e.details()
        r = s.PutBlocks(pb.PutBlocksRequest(model_id="tiny", sequence_id="x", first_index=0,
                                            blocks=[pb.BlockData(data=block(1))]), timeout=5)
        good = r.handles[0]
        stale = pb.BlockHandle(slot=good.slot, generation=good.generation + 2, tier=pb.TIER_HOST)
        try:
            s.GetBlocks(pb.GetBlocksRequest(handles=[good, stale]), timeout=5)
            raise AssertionError("a stale handle was served")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
            assert "handle 1" in e.details() and "stale" in e.details(), e.details()
        assert s.GetBlocks(pb.GetBlocksRequest(handles=[good]), timeout=5).blocks[0].data == block(1)
    finally:
        cl.close()


def test_bad_put_blocks_store_nothing():
    cl = Cluster(["1MiB"])
    try:
        s = cl.stub("n0")
        before = s.Stats(pb.StatsRequest(), timeout=5)
        bad = [
            pb.PutBlocksRequest(model_id="tiny", sequence_id="x",
                                blocks=[pb.BlockData(data=block(1)),
                                        pb.BlockData(data=block(2)[:-1])]),
            pb.PutBlocksRequest(model_id="tiny", sequence_id="x",
                                blocks=[pb.BlockData(data=block(1), key=b"short")]),
            pb.PutBlocksRequest(model_id="other", sequence_id="x",
                                blocks=[pb.BlockData(data=block(1))]),
            pb.PutBlocksRequest(model_id="tiny", sequence_id="",
                                blocks=[pb.BlockData(data=block(1))]),
            pb.PutBlocksRequest(model_id="tiny", sequence_id="x"),
        ]
        for req in bad:
            try:
                s.PutBlocks(req, timeout=5)
                raise AssertionError("accepted: %s" % req)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        after = s.Stats(pb.StatsRequest(), timeout=5)
        assert after.capacity == before.capacity, (before, after)
        assert after.counters["pinned_blocks"] == 0
        assert after.counters["slots_used"] == 0
    finally:
        cl.close()


def test_full_pool_is_resource_exhausted_and_the_reserve_is_kept():
    # 64 slots of 2 KiB in 128 KiB; 4 of them kept for tails, 60 offered.
    cl = Cluster(["128KiB"], **{"tail-reserve": "4"})
    try:
        s = cl.stub("n0")
        host = [t for t in nodes(cl.c)["n0"].capacity if t.tier == pb.TIER_HOST][0]
        assert host.total_blocks == 60, host
        c = cl.c.stub
        c.CreateSequence(pb.CreateSequenceRequest(model_id="tiny", sequence_id="x", home_node="n0"),
                         timeout=5)
        c.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="x", tokens=8 * 60), timeout=5)
        r = s.PutBlocks(pb.PutBlocksRequest(model_id="tiny", sequence_id="x", first_index=0,
                                            blocks=[pb.BlockData(data=block(i))
                                                    for i in range(60)]), timeout=10)
        assert len(r.handles) == 60
        # The ledger offers no more: the tails' reserve is not lent out.
        try:
            c.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="x", tokens=8), timeout=5)
            raise AssertionError("extended beyond the pool")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        st = s.Stats(pb.StatsRequest(), timeout=5)
        assert st.counters["pinned_blocks"] == 60 and st.counters["slots_used"] == 60, st
        wait_for("heartbeat shows the pool full",
                 lambda: [t for t in nodes(cl.c)["n0"].capacity
                          if t.tier == pb.TIER_HOST][0].free_blocks == 0)
        # Blocks put for a sequence the coordinator does not know are
        # released again (orphans), so they cannot leak the pool.
        s.PutBlocks(pb.PutBlocksRequest(model_id="tiny", sequence_id="nobody", first_index=0,
                                        blocks=[pb.BlockData(data=block(99))]), timeout=10)
        wait_for("the orphan released",
                 lambda: s.Stats(pb.StatsRequest(), timeout=5).counters["pinned_blocks"] == 60)
    finally:
        cl.close()


def test_data_server_listens_on_the_data_address():
    import socket
    cl = Cluster(["1MiB"])
    try:
        host, port = cl.agents["n0"].flags["data-address"].rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=2).close()
        assert "data_server" in cl.agents["n0"].read_log()
        assert "transport=tcp" in cl.agents["n0"].read_log()
    finally:
        cl.close()


def test_drain_drops_the_cache_and_keeps_live_blocks():
    cl = Cluster(["1MiB"])
    try:
        c, s = cl.c.stub, cl.stub("n0")
        for seq in ("gone", "live"):
            c.CreateSequence(pb.CreateSequenceRequest(model_id="tiny", sequence_id=seq, home_node="n0"),
                             timeout=5)
            c.ExtendSequence(pb.ExtendSequenceRequest(sequence_id=seq, tokens=8 * 3), timeout=5)
            s.PutBlocks(pb.PutBlocksRequest(
                model_id="tiny", sequence_id=seq, first_index=0,
                blocks=[pb.BlockData(data=block(i + len(seq)), key=b"%s-%011d" % (seq.encode(), i))
                        for i in range(3)]), timeout=5)
        c.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="gone"), timeout=5)
        # Released keyed blocks stay cached (evictable) once the agent unpins them.
        wait_for("the released blocks unpinned",
                 lambda: s.Stats(pb.StatsRequest(), timeout=5).counters["pinned_blocks"] == 3)
        assert s.Stats(pb.StatsRequest(), timeout=5).counters["evictions"] == 0
        c.DrainNode(pb.NodeRequest(node_id="n0"), timeout=5)
        wait_for("the cache dropped on drain",
                 lambda: s.Stats(pb.StatsRequest(), timeout=5).counters["evictions"] == 3)
        st = s.Stats(pb.StatsRequest(), timeout=5)
        assert st.counters["pinned_blocks"] == 3, st
        assert nodes(cl.c)["n0"].state == pb.NODE_DRAINING
        # The live sequence's blocks are still served.
        g = c.GetSequence(pb.GetSequenceRequest(sequence_id="live"), timeout=5)
        got = s.GetBlocks(pb.GetBlocksRequest(handles=[b.handle for b in g.blocks]), timeout=5)
        assert [b.data for b in got.blocks] == [block(i + 4) for i in range(3)]
        # And nothing new goes there.
        try:
            c.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="live", tokens=8), timeout=5)
            raise AssertionError("extended onto a draining node")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
    finally:
        cl.close()


if __name__ == "__main__":
    os.environ.setdefault("KVMESH_LOG_LEVEL", "info")
    run_tests([test_drain_drops_the_cache_and_keeps_live_blocks, test_put_get_blocks_where_the_coordinator_placed_them,
               test_stale_and_unknown_handles_are_not_found,
               test_bad_put_blocks_store_nothing,
               test_full_pool_is_resource_exhausted_and_the_reserve_is_kept,
               test_data_server_listens_on_the_data_address])
