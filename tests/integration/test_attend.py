#!/usr/bin/python3
"""The home agent of a sequence appends its K/V and runs attention over all
its blocks, wherever they live: a coordinator and three agents with small
pools, so a sequence borrows blocks on the others. Every Agent.AttendAppend
output is checked against a numpy softmax reference (fp16 and fp32, MHA and
GQA). A killed peer fails only the sequences that need it, naming it and the
lost blocks; ReleaseSequence gives the space back on every agent; a drained
home hands its sequences to another agent and decoding goes on there; a
hand-off that fails (a gone or stalled target) is taken back or sent to
another agent, and a switch arriving late is refused."""
import os
import signal
import time

import grpc
import numpy as np

from kvmesh_testlib import (Agent, AgentCluster, kvmesh_pb2 as pb, list_nodes,
                            run_tests, wait_for)

LAYERS, BT, HD = 2, 8, 16
SKIPPED = []


def model(dtype, q_heads, kv_heads):
    return pb.Model(id="m", q_heads=q_heads, geometry=pb.BlockGeometry(
        layers=LAYERS, kv_heads=kv_heads, head_dim=HD, block_tokens=BT, dtype=dtype))


def np_dtype(dtype):
    return np.float16 if dtype == pb.KV_DTYPE_F16 else np.float32


nodes = list_nodes


def reports_supported(c):
    try:
        c.stub.ReportBlocks(pb.ReportBlocksRequest(node_id="probe", incremental=True, last=True),
                            timeout=5)
    except grpc.RpcError as e:
        return e.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


class Cluster(AgentCluster):
    """Home n0 with a tiny pool; creditors n1, n2."""

    def __init__(self, m, home_slots=10, peer_slots=40, slots=None, **agent_flags):
        self.m = m
        g = m.geometry
        self.kvh, self.qh = g.kv_heads, m.q_heads
        self.dt = np_dtype(g.dtype)
        self.block_bytes = LAYERS * 2 * BT * self.kvh * HD * np.dtype(self.dt).itemsize
        slots = slots or (home_slots, peer_slots, peer_slots)
        super().__init__(m, [n * self.block_bytes for n in slots],
                         {"heartbeat": "200ms", "dead-after": "1500ms", "lend-share": "1"},
                         **dict({"tail-reserve": "4", "attend-timeout": "2s"}, **agent_flags))


class Seq:
    """A sequence's K/V as numpy holds it: [layer][token][kv_head][head_dim]."""

    def __init__(self, cl, sid, rng):
        self.cl, self.id, self.rng = cl, sid, rng
        self.k = [[] for _ in range(LAYERS)]
        self.v = [[] for _ in range(LAYERS)]

    def new_kv(self):
        shape = (self.cl.kvh, HD)
        return (self.rng.standard_normal(shape).astype(self.cl.dt),
                self.rng.standard_normal(shape).astype(self.cl.dt))

    def block_bytes(self, index):
        """Block `index` in the kvstore layout [layer][k|v][token][kv_head][head_dim]."""
        parts = []
        for l in range(LAYERS):
            parts.append(np.stack(self.k[l][index * BT:(index + 1) * BT]).tobytes())
            parts.append(np.stack(self.v[l][index * BT:(index + 1) * BT]).tobytes())
        return b"".join(parts)

    def reference(self, layer, q, scale):
        k = np.stack(self.k[layer]).astype(np.float64)  # [T][kvh][hd]
        v = np.stack(self.v[layer]).astype(np.float64)
        g = self.cl.qh // self.cl.kvh
        o = np.zeros((self.cl.qh, HD))
        lse = np.zeros(self.cl.qh)
        for h in range(self.cl.qh):
            s = scale * (k[:, h // g, :] @ q[h].astype(np.float64))
            mx = s.max()
            p = np.exp(s - mx)
            lse[h] = mx + np.log(p.sum())
            o[h] = (p / p.sum()) @ v[:, h // g, :]
        return o, lse


def step(cl, stub, seqs, layer, rtol):
    """One AttendAppend for every sequence of `seqs` at `layer`: appends one
    new token each and checks the outputs."""
    qs, reqs = [], []
    for s in seqs:
        k, v = s.new_kv()
        s.k[layer].append(k)
        s.v[layer].append(v)
        q = s.rng.standard_normal((cl.qh, HD)).astype(np.float32)
        qs.append(q)
        reqs.append(pb.AttendQuery(sequence_id=s.id, q=q.ravel().tolist(), k_new=k.tobytes(),
                                   v_new=v.tobytes()))
    r = stub.AttendAppend(pb.AttendAppendRequest(model_id="m", layer=layer, scale=0,
                                                 queries=reqs), timeout=10)
    assert len(r.results) == len(seqs)
    for s, q, res in zip(seqs, qs, r.results):
        assert res.sequence_id == s.id
        o_ref, lse_ref = s.reference(layer, q, 1.0 / np.sqrt(HD))
        o = np.array(res.o).reshape(cl.qh, HD)
        lse = np.array(res.lse)
        np.testing.assert_allclose(o, o_ref, rtol=rtol, atol=rtol,
                                   err_msg="seq %s layer %d token %d" % (s.id, layer,
                                                                         len(s.k[layer]) - 1))
        np.testing.assert_allclose(lse, lse_ref, rtol=rtol, atol=rtol)


def decode(cl, stub, seqs, n, rtol):
    for _ in range(n):
        for layer in range(LAYERS):
            step(cl, stub, seqs, layer, rtol)


def holders(cl, sid):
    seq = cl.c.stub.GetSequence(pb.GetSequenceRequest(sequence_id=sid), timeout=5)
    return seq, {p.node_id for p in seq.blocks}


def run_decode_only(dtype, q_heads, kv_heads, rtol):
    """A sequence written entirely by decode: its tails seal onto the nodes
    the ledger picks (ExtendSequence by the home), mostly creditors."""
    cl = Cluster(model(dtype, q_heads, kv_heads))
    try:
        rng = np.random.default_rng(7)
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="d1",
                                                          home_node="n0"), timeout=5)
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="d2",
                                                          home_node="n0"), timeout=5)
        s1, s2 = Seq(cl, "d1", rng), Seq(cl, "d2", rng)
        home = cl.stub("n0")
        decode(cl, home, [s1, s2], 5 * BT + 3, rtol)  # both in one batch
        decode(cl, home, [s1], 2 * BT, rtol)
        seq, where = holders(cl, "d1")
        assert len(seq.blocks) >= 7, seq
        assert {"n1", "n2"} & where, "nothing borrowed: %s" % where
        st = home.Stats(pb.StatsRequest(), timeout=5)
        assert st.counters["home_sequences"] == 2, st
    finally:
        cl.close()


def test_decode_only_fp16_gqa():
    run_decode_only(pb.KV_DTYPE_F16, 4, 2, 2e-3)


def test_decode_only_fp32_mha():
    run_decode_only(pb.KV_DTYPE_F32, 2, 2, 1e-4)


def test_prefill_write_back_then_decode():
    """Full prompt blocks go to the placed nodes with PutBlocks; the rest of
    the prompt and the decode tokens through AttendAppend."""
    cl = Cluster(model(pb.KV_DTYPE_F16, 4, 2))
    try:
        if not reports_supported(cl.c):
            SKIPPED.append("the coordinator takes no block reports yet (ReportBlocks "
                           "UNIMPLEMENTED): GetSequence has no handles")
            return
        rng = np.random.default_rng(11)
        prompt = 5 * BT + 3
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="p1",
                                                          home_node="n0"), timeout=5)
        ext = cl.c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="p1", tokens=prompt),
                                       timeout=5)
        s = Seq(cl, "p1", rng)
        for l in range(LAYERS):
            for _ in range(prompt):
                k, v = s.new_kv()
                s.k[l].append(k)
                s.v[l].append(v)
        full = prompt // BT
        for p in ext.new_blocks:
            if p.index < full:
                cl.stub(p.node_id).PutBlocks(pb.PutBlocksRequest(
                    model_id="m", sequence_id="p1", first_index=p.index,
                    blocks=[pb.BlockData(data=s.block_bytes(p.index))]), timeout=5)
        # The prompt's last partial block: appended on the home, layer by
        # layer, by AttendAppend (each call checks attention so far).
        tail_k = [s.k[l][full * BT:] for l in range(LAYERS)]
        tail_v = [s.v[l][full * BT:] for l in range(LAYERS)]
        for l in range(LAYERS):
            del s.k[l][full * BT:]
            del s.v[l][full * BT:]
        home = cl.stub("n0")
        for i in range(prompt - full * BT):
            for l in range(LAYERS):
                gen = iter([(tail_k[l][i], tail_v[l][i])])
                s.new_kv = lambda gen=gen: next(gen)
                step(cl, home, [s], l, 2e-3)
        del s.new_kv
        decode(cl, home, [s], 2 * BT, 2e-3)
    finally:
        cl.close()


def test_killed_peer_fails_only_the_sequences_that_need_it():
    cl = Cluster(model(pb.KV_DTYPE_F16, 4, 2))
    try:
        rng = np.random.default_rng(3)
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="big",
                                                          home_node="n0"), timeout=5)
        big = Seq(cl, "big", rng)
        home = cl.stub("n0")
        decode(cl, home, [big], 8 * BT + 1, 2e-3)
        seq, where = holders(cl, "big")
        victim = "n2" if "n2" in where else "n1"
        assert victim in where, where
        lost = sorted(p.index for p in seq.blocks if p.node_id == victim)
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="small",
                                                          home_node="n0"), timeout=5)
        small = Seq(cl, "small", rng)
        decode(cl, home, [small], 3, 2e-3)  # tail only: on the home
        cl.agents[victim].stop(sig="KILL")
        try:
            decode(cl, home, [big], 1, 2e-3)
            raise AssertionError("attention over a dead peer's blocks succeeded")
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE,
                                grpc.StatusCode.DEADLINE_EXCEEDED), e
            d = e.details()
            assert "peer %s" % victim in d, d
            assert "lost blocks " + ",".join(map(str, lost)) in d, (d, lost)
        assert "attend_peer_failed" in cl.agents["n0"].read_log()
        decode(cl, home, [small], 2, 2e-3)  # still answers
    finally:
        cl.close()


def test_release_sequence_gives_space_back_everywhere():
    cl = Cluster(model(pb.KV_DTYPE_F16, 4, 2))
    try:
        if not reports_supported(cl.c):
            SKIPPED.append("the coordinator sends no release commands yet (no ReportBlocks)")
            return
        rng = np.random.default_rng(5)
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="r1",
                                                          home_node="n0"), timeout=5)
        s = Seq(cl, "r1", rng)
        decode(cl, cl.stub("n0"), [s], 7 * BT + 2, 2e-3)
        stubs = {n: cl.stub(n) for n in cl.agents}
        used = {n: st.Stats(pb.StatsRequest(), timeout=5).counters["slots_used"]
                for n, st in stubs.items()}
        assert sum(used.values()) >= 8, used
        cl.c.stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="r1"), timeout=5)

        def empty():
            return all(st.Stats(pb.StatsRequest(), timeout=5).counters["pinned_blocks"] == 0 and
                       st.Stats(pb.StatsRequest(), timeout=5).counters["home_sequences"] == 0 and
                       st.Stats(pb.StatsRequest(), timeout=5).counters["tail_blocks"] == 0
                       for st in stubs.values())
        wait_for("every pin and tail released", empty, timeout=10)
    finally:
        cl.close()


def step_following_home(cl, seqs, layer, rtol, homes):
    """step() for each sequence at its home as the coordinator names it
    (homes: id -> node, updated): an append refused because the home moved
    (FAILED_PRECONDITION, nothing applied) is sent again, same K/V and
    query, to the new home."""
    for s in seqs:
        k, v = s.new_kv()
        q = s.rng.standard_normal((cl.qh, HD)).astype(np.float32)
        req = pb.AttendAppendRequest(model_id="m", layer=layer, scale=0, queries=[
            pb.AttendQuery(sequence_id=s.id, q=q.ravel().tolist(), k_new=k.tobytes(),
                           v_new=v.tobytes())])
        for attempt in range(100):
            try:
                r = cl.stub(homes[s.id]).AttendAppend(req, timeout=10)
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION or attempt == 99:
                    raise
                time.sleep(0.05)
                homes[s.id] = holders(cl, s.id)[0].home_node
        s.k[layer].append(k)
        s.v[layer].append(v)
        o_ref, lse_ref = s.reference(layer, q, 1.0 / np.sqrt(HD))
        np.testing.assert_allclose(np.array(r.results[0].o).reshape(cl.qh, HD), o_ref,
                                   rtol=rtol, atol=rtol,
                                   err_msg="seq %s layer %d token %d at %s" % (
                                       s.id, layer, len(s.k[layer]) - 1, homes[s.id]))
        np.testing.assert_allclose(np.array(r.results[0].lse), lse_ref, rtol=rtol, atol=rtol)


def decode_following(cl, seqs, n, homes):
    """n decode steps (every layer) of seqs, each at its home as the
    coordinator names it (step_following_home)."""
    for _ in range(n):
        for layer in range(LAYERS):
            step_following_home(cl, seqs, layer, 2e-3, homes)


def homed_on_n0(cl, seed):
    """Sequence "s" homed on n0, with a full block and a tail of 3 tokens,
    every output checked: (its Seq, the homes map that follows it)."""
    cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="s",
                                                      home_node="n0"), timeout=5)
    s, homes = Seq(cl, "s", np.random.default_rng(seed)), {"s": "n0"}
    decode_following(cl, [s], BT + 3, homes)
    return s, homes


def late_switch_is_refused(cl, sid, frm, to, epoch, now):
    """A MoveSequenceHome sent at an older home epoch (as a target's switch
    that reaches the coordinator late) is refused and changes nothing."""
    before = holders(cl, sid)[0]
    try:
        cl.c.stub.MoveSequenceHome(pb.MoveSequenceHomeRequest(
            sequence_id=sid, from_node=frm, to_node=to, home_epoch=epoch), timeout=5)
        raise AssertionError("a late switch landed")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
        assert "home epoch %d, not %d" % (now, epoch) in e.details(), e.details()
    assert holders(cl, sid)[0] == before


def paused_adoption_cluster(**agent_flags):
    """A Cluster whose agents pause 1.5 s before an adoption's switch (the
    KVMESH_TEST_ADOPT_PAUSE_MS failpoint); n1 has the most room."""
    os.environ["KVMESH_TEST_ADOPT_PAUSE_MS"] = "1500"
    try:
        return Cluster(model(pb.KV_DTYPE_F16, 4, 2), slots=(10, 60, 40), **agent_flags)
    finally:
        del os.environ["KVMESH_TEST_ADOPT_PAUSE_MS"]


def test_drained_home_hands_its_sequences_over():
    """Draining a home moves its sequences: another agent adopts each one's
    tail (partial block, exact bytes) and becomes its home, the blocks on
    the drained node move off, and decoding goes on at the new home with
    the same results, also once the old home is gone."""
    cl = Cluster(model(pb.KV_DTYPE_F16, 4, 2))
    try:
        rng = np.random.default_rng(13)
        for sid in ("h1", "h2", "h3"):
            cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id=sid,
                                                              home_node="n0"), timeout=5)
        h1, h2, h3 = Seq(cl, "h1", rng), Seq(cl, "h2", rng), Seq(cl, "h3", rng)
        homes = {"h1": "n0", "h2": "n0", "h3": "n0"}
        # h3: two prompt blocks written where they were placed; its home has
        # never served it when the drain comes.
        ext = cl.c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="h3", tokens=2 * BT),
                                       timeout=5)
        for l in range(LAYERS):
            for _ in range(2 * BT):
                k, v = h3.new_kv()
                h3.k[l].append(k)
                h3.v[l].append(v)
        for p in ext.new_blocks:
            cl.stub(p.node_id).PutBlocks(pb.PutBlocksRequest(
                model_id="m", sequence_id="h3", first_index=p.index,
                blocks=[pb.BlockData(data=h3.block_bytes(p.index))]), timeout=5)
        decode_following(cl, [h1], 3 * BT + 3, homes)  # full blocks, and 3 tokens in the tail
        decode_following(cl, [h2], 2, homes)  # a tail only
        cl.c.stub.DrainNode(pb.NodeRequest(node_id="n0"), timeout=5)
        # Decoding goes on during the hand-off and the moves.
        decode_following(cl, [h1, h2], BT, homes)

        def drained():
            n0 = list_nodes(cl.c)["n0"]
            return n0.drain_blocks_left == 0 and n0.drain_home_sequences == 0
        wait_for("n0 drained", drained, timeout=30)
        for sid in homes:
            seq, where = holders(cl, sid)
            assert seq.home_node != "n0" and "n0" not in where, (sid, seq.home_node, where)
            homes[sid] = seq.home_node  # h3's client learns it now
        assert set(homes.values()) == {"n1", "n2"}, ("hand-offs not spread", homes)
        log = cl.agents["n0"].read_log()
        assert "event=hand_off seq=h1" in log and "event=hand_off seq=h2" in log, log[-3000:]
        assert "home_moved" in cl.c.read_log()
        counters = {n: cl.stub(n).Stats(pb.StatsRequest(), timeout=5).counters for n in cl.agents}
        assert counters["n0"]["hand_offs"] == 3 and counters["n0"]["hand_off_failures"] == 0
        assert counters["n1"]["adoptions"] + counters["n2"]["adoptions"] == 3, counters
        cl.agents["n0"].stop(sig="KILL")
        decode_following(cl, [h1, h2, h3], BT + 1, homes)
        assert "n0" not in homes.values(), homes
    finally:
        cl.close()


def test_refused_hand_off_leaves_the_sequence_served_where_it_was():
    """The chosen agent is gone (killed; not yet declared dead): the
    adoption fails, and the old home, which the coordinator still names,
    takes appends again; decoding goes on there with the same results."""
    cl = Cluster(model(pb.KV_DTYPE_F16, 4, 2))
    try:
        rng = np.random.default_rng(17)
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="r",
                                                          home_node="n0"), timeout=5)
        s = Seq(cl, "r", rng)
        homes = {"r": "n0"}
        decode_following(cl, [s], 3, homes)
        for n in ("n1", "n2"):  # gone, but ready for another 1.5 s
            cl.agents[n].stop(sig="KILL")
        cl.c.stub.DrainNode(pb.NodeRequest(node_id="n0"), timeout=5)
        wait_for("the failed hand-off", lambda: "hand_off_failed" in cl.agents["n0"].read_log(),
                 timeout=15)
        log = cl.agents["n0"].read_log()
        assert "appends=\"taken again\"" in log, log[-2000:]
        st = cl.stub("n0").Stats(pb.StatsRequest(), timeout=5).counters
        assert st["hand_off_failures"] >= 1 and st["hand_offs"] == 0, st
        decode_following(cl, [s], BT, homes)
        assert homes["r"] == "n0" and holders(cl, "r")[0].home_node == "n0"
        assert list_nodes(cl.c)["n0"].drain_home_sequences == 1
        # Taken back at a new epoch: a switch to n1 sent at the old one
        # (one that reached the coordinator late) is refused.
        assert holders(cl, "r")[0].home_epoch == 2
        late_switch_is_refused(cl, "r", "n0", "n1", 1, 2)
    finally:
        cl.close()


def test_stalled_target_is_fenced_and_the_sequence_goes_elsewhere():
    """The chosen agent stops answering while it is asked to adopt
    (SIGSTOP): the old home refuses appends (nothing applied) until the
    coordinator sends the hand-off again, to another agent, which adopts the
    sequence at the epoch the old home saw. The stalled call then fails, and
    the old home, refused a take-back, drops its copy. A switch at the old
    epoch is refused, the resumed agent never serves the sequence, and every
    output, before and after, matches the reference."""
    cl = Cluster(model(pb.KV_DTYPE_F16, 4, 2), slots=(10, 60, 40))
    stalled = cl.agents["n1"]
    try:
        s, homes = homed_on_n0(cl, 19)
        os.kill(stalled.proc.pid, signal.SIGSTOP)  # n1 has the most room: the target
        t0 = time.monotonic()
        cl.c.stub.DrainNode(pb.NodeRequest(node_id="n0"), timeout=5)
        wait_for("the hand-off to n1", lambda: "hand_off_started seq=s to=n1" in
                 cl.agents["n0"].read_log(), timeout=5)
        assert "moving to n1" in refusal(cl, s, "n0")
        wait_for("s homed on n2", lambda: holders(cl, "s")[0].home_node == "n2", timeout=40)
        took = time.monotonic() - t0
        seq = holders(cl, "s")[0]
        assert seq.home_epoch == 2, seq
        assert 9 < took < 20, took  # the coordinator's resend, 10 s after the first
        decode_following(cl, [s], BT, homes)
        assert homes["s"] == "n2"
        # n0 drops its copy 3 s after the hand-off; the stalled call fails
        # at 15 s and changes nothing.
        wait_for("the stalled call failed", lambda: "hand_off_failed seq=s to=n1" in
                 cl.agents["n0"].read_log(), timeout=20)
        assert "appends=\"not held here any more\"" in cl.agents["n0"].read_log()
        st = cl.stub("n0").Stats(pb.StatsRequest(), timeout=5).counters
        assert (st["hand_offs"], st["hand_off_failures"], st["home_sequences"]) == (1, 1, 0), st
        late_switch_is_refused(cl, "s", "n2", "n1", 1, 2)
        os.kill(stalled.proc.pid, signal.SIGCONT)
        wait_for("n1 back", lambda: list_nodes(cl.c)["n1"].state == pb.NODE_READY, timeout=10)
        decode_following(cl, [s], 2, homes)
        st = cl.stub("n1").Stats(pb.StatsRequest(), timeout=5).counters
        assert st["adoptions"] == 0 and st["home_sequences"] == 0, st
        assert holders(cl, "s")[0].home_node == "n2"
    finally:
        os.kill(stalled.proc.pid, signal.SIGCONT)
        cl.close()


def test_switch_with_the_coordinator_unreachable_loses_nothing():
    """The coordinator stops (SIGSTOP) just as the target is about to make
    itself the home (a test failpoint pauses it there): the target's switch
    and the old home's take-back both go unanswered, so nobody knows
    whether the switch will land. The target keeps its copy pending and the
    old home refuses appends; once the coordinator runs again, whichever
    home it names serves the sequence with every row (outputs match the
    reference), and in the end exactly one agent holds it."""
    # Quick timeouts to the coordinator, so that the test is short.
    cl = paused_adoption_cluster(**{"call-timeout": "1s"})
    coord = cl.c.proc.pid
    try:
        s, homes = homed_on_n0(cl, 23)
        cl.c.stub.DrainNode(pb.NodeRequest(node_id="n0"), timeout=5)
        wait_for("n1 paused before its switch", lambda: "adopt_paused seq=s" in
                 cl.agents["n1"].read_log(), timeout=10)
        os.kill(coord, signal.SIGSTOP)
        try:
            wait_for("the switch unanswered", lambda: "adoption_pending seq=s" in
                     cl.agents["n1"].read_log(), timeout=10)
            wait_for("the take-back unanswered", lambda: "hand_off_failed seq=s" in
                     cl.agents["n0"].read_log(), timeout=10)
        finally:
            os.kill(coord, signal.SIGCONT)
        assert "refused until the coordinator says" in cl.agents["n0"].read_log()
        # Decoding resumes at the home the coordinator names, with every row.
        deadline = time.time() + 45
        while True:
            try:
                homes["s"] = holders(cl, "s")[0].home_node
                step_following_home(cl, [s], 0, 2e-3, homes)
                step_following_home(cl, [s], 1, 2e-3, homes)
                break
            except grpc.RpcError as e:
                assert time.time() < deadline, e
                time.sleep(0.5)
        decode_following(cl, [s], BT, homes)

        def copies():
            return {n: cl.stub(n).Stats(pb.StatsRequest(), timeout=5).counters["home_sequences"]
                    for n in cl.agents}
        wait_for("one copy left", lambda: sum(copies().values()) == 1, timeout=20)
        assert copies()[holders(cl, "s")[0].home_node] == 1, copies()
    finally:
        os.kill(coord, signal.SIGCONT)
        cl.close()


def test_a_lost_home_degrades_its_sequences():
    """A home's sequences keep their last tokens (the tail) only on the home:
    when it dies, or its agent restarts faster than dead-after, they are
    degraded, with a reason and a DEGRADED event, even those with no block
    on it; the restarted home refuses them (no attention over a context with
    rows missing) and serves new ones; a drain leaves them to be released."""
    cl = Cluster(model(pb.KV_DTYPE_F16, 4, 2))
    try:
        rng = np.random.default_rng(29)
        seqs = {}
        for sid in ("t0", "f0", "t1"):  # t*: a tail only; f0: full blocks too
            cl.c.stub.CreateSequence(pb.CreateSequenceRequest(
                model_id="m", sequence_id=sid, home_node="n" + sid[1]), timeout=5)
            seqs[sid] = Seq(cl, sid, rng)
        decode(cl, cl.stub("n0"), [seqs["t0"]], 3, 2e-3)
        decode(cl, cl.stub("n0"), [seqs["f0"]], 2 * BT + 3, 2e-3)
        decode(cl, cl.stub("n1"), [seqs["t1"]], 3, 2e-3)
        assert not holders(cl, "t1")[0].blocks  # nothing but the tail, on n1
        events = cl.c.stub.WatchEvents(pb.WatchEventsRequest(), timeout=30)
        # n1 restarts at once (as systemd would): never declared dead.
        cl.agents["n1"].stop(sig="KILL")
        cl.agents["n1"].start()
        wait_for("n1 restarted", lambda: "event=node_restarted node=n1" in cl.c.read_log())
        t1 = holders(cl, "t1")[0]
        assert t1.degraded and t1.home_node == "n1", t1
        st = cl.stub("n1")
        try:
            decode(cl, st, [seqs["t1"]], 1, 2e-3)
            raise AssertionError("the restarted home served a sequence whose tail it lost")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
            assert "degraded" in e.details(), e.details()
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="new",
                                                          home_node="n1"), timeout=5)
        decode(cl, st, [Seq(cl, "new", rng)], 2, 2e-3)
        assert not holders(cl, "f0")[0].degraded  # nothing of it was on n1
        # n0 dies: its sequences, with or without blocks there, are degraded.
        cl.agents["n0"].stop(sig="KILL")
        wait_for("n0 dead", lambda: list_nodes(cl.c)["n0"].state == pb.NODE_DEAD, timeout=5)
        for sid in ("t0", "f0"):
            assert holders(cl, sid)[0].degraded, sid
        assert not holders(cl, "new")[0].degraded
        why = {}
        for e in events:
            if e.HasField("sequence") and e.sequence.kind == pb.SequenceEvent.DEGRADED:
                why[e.sequence.sequence_id] = e.sequence.reason
                if len(why) == 3:
                    break
        events.cancel()
        assert "its home n1 restarted" in why["t1"], why
        assert "its home n0 died" in why["t0"] and "its home n0 died" in why["f0"], why
        # Draining n1 hands "new" to n2 and leaves t1 (not served) to be released.
        cl.c.stub.DrainNode(pb.NodeRequest(node_id="n1"), timeout=5)
        wait_for("n1 drained", lambda: list_nodes(cl.c)["n1"].drain_home_sequences == 0 and
                 list_nodes(cl.c)["n1"].drain_blocks_left == 0, timeout=15)
        assert holders(cl, "new")[0].home_node == "n2"
        assert holders(cl, "t1")[0].home_node == "n1"
        assert "hand_off_failed" not in cl.agents["n1"].read_log()
        cl.c.stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="t1"), timeout=5)
    finally:
        cl.close()


def test_a_home_declared_dead_and_back_refuses_what_was_degraded():
    """A home stopped longer than dead-after (SIGSTOP) is declared dead and
    its sequences degraded; when it runs again it registers again, and
    refuses them though it still holds them (the coordinator's word), while
    a sequence created after serves as usual."""
    cl = Cluster(model(pb.KV_DTYPE_F16, 4, 2))
    try:
        rng = np.random.default_rng(31)
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="h",
                                                          home_node="n0"), timeout=5)
        h = Seq(cl, "h", rng)
        decode(cl, cl.stub("n0"), [h], BT + 2, 2e-3)
        pid = cl.agents["n0"].proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for("n0 dead", lambda: list_nodes(cl.c)["n0"].state == pb.NODE_DEAD, timeout=5)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for("n0 back", lambda: list_nodes(cl.c)["n0"].state == pb.NODE_READY, timeout=5)
        assert holders(cl, "h")[0].degraded
        try:
            decode(cl, cl.stub("n0"), [h], 1, 2e-3)
            raise AssertionError("a degraded sequence was served")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
            assert "degraded" in e.details(), e.details()
        wait_for("h dropped", lambda: cl.stub("n0").Stats(
            pb.StatsRequest(), timeout=5).counters["home_sequences"] == 0, timeout=5)
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="h2",
                                                          home_node="n0"), timeout=5)
        decode(cl, cl.stub("n0"), [Seq(cl, "h2", rng)], BT + 2, 2e-3)
    finally:
        cl.close()


def test_target_killed_mid_adoption():
    """The target dies while it adopts (SIGKILL during a failpoint pause,
    after it installed the tail): the old home's call fails at once, it
    takes the sequence back (appends resume there, at a new epoch), and the
    coordinator's next HandOff goes to another agent; no row is lost."""
    cl = paused_adoption_cluster()
    try:
        s, homes = homed_on_n0(cl, 37)
        cl.c.stub.DrainNode(pb.NodeRequest(node_id="n0"), timeout=5)
        wait_for("n1 adopting", lambda: "adopt_paused seq=s" in cl.agents["n1"].read_log(),
                 timeout=10)
        cl.agents["n1"].stop(sig="KILL")
        wait_for("taken back", lambda: "appends=\"taken again\"" in cl.agents["n0"].read_log(),
                 timeout=10)
        assert holders(cl, "s")[0].home_epoch == 2
        decode_following(cl, [s], 2, homes)  # served by n0 again
        wait_for("s homed on n2", lambda: holders(cl, "s")[0].home_node == "n2", timeout=20)
        decode_following(cl, [s], BT, homes)
        assert homes["s"] == "n2" and holders(cl, "s")[0].home_epoch == 3
    finally:
        cl.close()


def test_a_step_sent_again_with_its_token_is_refused_not_applied_twice():
    """AttendQuery.token: a step sent again after a lost reply names a
    position already filled and is refused (INVALID_ARGUMENT, naming the
    next one), so the context never holds a row twice; unset, a step goes
    to the next position as before. A batch with a refused query appends
    nothing, and one naming a sequence twice is refused."""
    cl = Cluster(model(pb.KV_DTYPE_F16, 4, 2))
    try:
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="p",
                                                          home_node="n0"), timeout=5)
        s, home = Seq(cl, "p", np.random.default_rng(41)), cl.stub("n0")

        def send(layer, token, k, v, q):
            return home.AttendAppend(pb.AttendAppendRequest(model_id="m", layer=layer, queries=[
                pb.AttendQuery(sequence_id="p", q=q.ravel().tolist(), k_new=k.tobytes(),
                               v_new=v.tobytes(), token=token)]), timeout=10)
        for t in range(BT + 2):  # past a block boundary: sealed rows count too
            for layer in range(LAYERS):
                k, v = s.new_kv()
                q = s.rng.standard_normal((cl.qh, HD)).astype(np.float32)
                r = send(layer, t, k, v, q)
                s.k[layer].append(k)
                s.v[layer].append(v)
                o_ref, _ = s.reference(layer, q, 1.0 / np.sqrt(HD))
                np.testing.assert_allclose(np.array(r.results[0].o).reshape(cl.qh, HD), o_ref,
                                           rtol=2e-3, atol=2e-3)
        for token, want in ((BT + 1, "token %d, the next is %d" % (BT + 1, BT + 2)),
                            (0, "the next is %d" % (BT + 2)),
                            (BT + 5, "the next is %d" % (BT + 2)),
                            (2 ** 63, "out of range")):
            k, v = s.new_kv()
            try:
                send(0, token, k, v, np.zeros((cl.qh, HD), np.float32))
                raise AssertionError("token %d was taken" % token)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
                assert want in e.details(), e.details()
        decode(cl, home, [s], 2, 2e-3)  # no token: the next position; no row twice
        # A batch is taken whole or not at all: one refused query (a wrong
        # token on p) leaves the other (o) unappended too.
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="o",
                                                          home_node="n0"), timeout=5)
        o = Seq(cl, "o", s.rng)
        k, v = o.new_kv()
        pk, pv = s.new_kv()
        zero = [0.0] * (cl.qh * HD)
        batch = [pb.AttendQuery(sequence_id="o", q=zero, k_new=k.tobytes(), v_new=v.tobytes(),
                                token=0),
                 pb.AttendQuery(sequence_id="p", q=zero, k_new=pk.tobytes(), v_new=pv.tobytes(),
                                token=0)]
        for queries, want in ((batch, "query 1: sequence p layer 0: token 0, the next is"),
                              ([batch[0], batch[0]], "named twice in one batch")):
            try:
                home.AttendAppend(pb.AttendAppendRequest(model_id="m", layer=0, queries=queries),
                                  timeout=10)
                raise AssertionError("a batch with a refused query was taken")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
                assert want in e.details(), e.details()
        decode(cl, home, [o, s], 2, 2e-3)  # o starts at token 0: nothing was appended
    finally:
        cl.close()


def refusal(cl, s, node):
    """Why node refuses an append to s (the test fails if it takes it)."""
    k, v = s.new_kv()
    try:
        cl.stub(node).AttendAppend(pb.AttendAppendRequest(model_id="m", layer=0, scale=0, queries=[
            pb.AttendQuery(sequence_id=s.id, q=[0.0] * (cl.qh * HD), k_new=k.tobytes(),
                           v_new=v.tobytes())]), timeout=5)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
        return e.details()
    raise AssertionError("%s took an append to %s" % (node, s.id))


def test_agents_keep_to_their_model():
    """Agents of two models in one cluster: a sequence borrows only from
    agents of its model, is homed only on one, and a drain hands it only to
    one."""
    m = model(pb.KV_DTYPE_F16, 4, 2)
    cl = Cluster(m)
    try:
        other = pb.Model(id="other", q_heads=4, geometry=m.geometry)
        cl.c.stub.RegisterModel(other, timeout=5)
        cl.agents.pop("n2").close()
        x = Agent(cl.c, "x1", "other", host_pool=str(60 * cl.block_bytes))
        cl.agents["x1"] = x
        wait_for("x1 ready, n2 dead", lambda: list_nodes(cl.c).get("x1") is not None and
                 list_nodes(cl.c)["x1"].state == pb.NODE_READY and
                 list_nodes(cl.c)["n2"].state == pb.NODE_DEAD)
        assert {n.id: n.model_id for n in list_nodes(cl.c).values()} == \
            {"n0": "m", "n1": "m", "n2": "m", "x1": "other"}
        try:
            cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="bad",
                                                              home_node="x1"), timeout=5)
            raise AssertionError("a sequence of m homed on an agent of another model")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
            assert "model other" in e.details(), e.details()
        o = cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="other",
                                                              sequence_id="o"), timeout=5)
        assert o.home_node == "x1", o.home_node
        # n0 holds 6 blocks (10 less the tail reserve); 30 more: n1 lends
        # (up to 36), x1 never does, though it has the most room.
        cl.c.stub.CreateSequence(pb.CreateSequenceRequest(model_id="m", sequence_id="w",
                                                          home_node="n0"), timeout=5)
        ext = cl.c.stub.ExtendSequence(pb.ExtendSequenceRequest(sequence_id="w",
                                                                tokens=36 * BT), timeout=5)
        where = {p.node_id for p in ext.new_blocks}
        assert where == {"n0", "n1"}, where
        cl.c.stub.DrainNode(pb.NodeRequest(node_id="n0"), timeout=5)
        wait_for("w handed off", lambda: holders(cl, "w")[0].home_node != "n0", timeout=15)
        assert holders(cl, "w")[0].home_node == "n1"
    finally:
        cl.close()


if __name__ == "__main__":
    os.environ.setdefault("KVMESH_LOG_LEVEL", "info")
    run_tests([test_decode_only_fp16_gqa,
               test_decode_only_fp32_mha,
               test_prefill_write_back_then_decode,
               test_killed_peer_fails_only_the_sequences_that_need_it,
               test_release_sequence_gives_space_back_everywhere,
               test_drained_home_hands_its_sequences_over,
               test_refused_hand_off_leaves_the_sequence_served_where_it_was,
               test_stalled_target_is_fenced_and_the_sequence_goes_elsewhere,
               test_switch_with_the_coordinator_unreachable_loses_nothing,
               test_target_killed_mid_adoption,
               test_a_lost_home_degrades_its_sequences,
               test_a_home_declared_dead_and_back_refuses_what_was_degraded,
               test_a_step_sent_again_with_its_token_is_refused_not_applied_twice,
               test_agents_keep_to_their_model], SKIPPED)
