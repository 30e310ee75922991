/* make bench-drain: draining a node (moving the blocks other nodes'
 * sequences keep there) against writing the same blocks, in the same run.
 *
 * A local cluster (coordinator --heartbeat=200ms, three agents). Two filler
 * sequences take the room of agent-1 and agent-2, so that a sequence
 * "wide" homed on agent-1 borrows all its blocks from agent-3; the fillers
 * go, leaving agent-1 room to take them back. The peer: the time of
 * kvm_seq_write_blocks of wide's blocks (the same bytes over the same
 * Agent.PutBlocks path, from a client). Then DrainNode on agent-3 and
 * ListNodes every 10 ms until its drain_blocks_left is 0. Afterwards no
 * block of wide is on agent-3 and kvm_seq_read_blocks returns what was
 * written.
 *
 * Environment: KVMESH_BENCH_BLOCKS (default 2048 blocks of 256 KiB: 64
 * tokens x 8 KV heads x 128 dim x fp16, one layer), KVMESH_BENCH_ROUNDS (1),
 * KVMESH_BENCH_KEEP=1 (keep the daemons' logs).
 * KVMESH_BENCH_BIN_DIR_B=DIR runs every round with the daemons of DIR too
 * (another build; B first, then this one), for before/after in one run.
 * Final lines: drain_blocks, drain_s, drain_blocks_per_s, drain_MiB_per_s,
 * write_MiB_per_s, drain_vs_write (medians over rounds); with B also
 * b_drain_s, b_drain_vs_write and drain_speedup_vs_b.
 *
 * Then the hand-off (run_handoff): a drained home's sequences move to other
 * agents while decode goes on; handoff_s (DrainNode to the last hand-off),
 * against the heartbeat period that carries the commands, and the decode
 * step's time before and during (handoff_decode_*). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench_util.h"
#include "client/demo/launch.h"
#include "client/demo/nodes.h"
#include "client/kvmesh.h"
#include "common/rpc.h"
#include "proto/kvmesh.pb-c.h"

#define BT 64u /* block tokens */
#define TAIL_RESERVE 16u

/* Blocks of seq written on node. */
static int blocks_on(kvm_client *c, const char *seq, const char *node, uint32_t n_blocks, uint32_t *on)
{
	kvm_block_info *bi = calloc(n_blocks + 1, sizeof *bi);
	uint32_t total = 0;
	int rc = bi ? kvm_seq_blocks(c, seq, bi, n_blocks + 1, &total) : -ENOMEM;
	*on = 0;
	for (uint32_t i = 0; rc == 0 && i < total && i <= n_blocks; i++)
		*on += bi[i].written && strcmp(bi[i].node, node) == 0;
	free(bi);
	return rc;
}

/* A sequence homed on `home` holding n placed (never written) blocks. */
static int filler(kvm_client *c, const char *model, const char *id, const char *home, uint32_t n)
{
	int rc = kvm_seq_create(c, model, id, NULL, 0, home, NULL);
	return rc ? rc : kvm_seq_extend(c, id, n * BT, NULL);
}

typedef struct round_result {
	double write_s, drain_s;
	uint32_t moved;
} round_result;

/* A local cluster with three agents of model m (pool bytes each) and a
 * client with the model registered; 0 or -1 (said why on stderr). */
static int cluster_up(const char *const *coord_flags, const kvm_model *m, const char *pool,
		      const char *const *agent_flags, local_cluster **lc, kvm_client **c)
{
	char err[2048];
	*c = NULL;
	if (local_cluster_start(coord_flags, lc, err, sizeof err) != 0) {
		fprintf(stderr, "bench-drain: %s\n", err);
		*lc = NULL;
		return -1;
	}
	int rc = kvm_client_open(local_cluster_coordinator(*lc), NULL, c);
	if (rc == 0)
		rc = kvm_model_register(*c, m);
	if (rc == 0 && (rc = local_cluster_add_agents(*lc, 3, m->id, pool, agent_flags, err,
						      sizeof err)) != 0)
		fprintf(stderr, "bench-drain: %s\n", err);
	return rc ? -1 : 0;
}

/* Closes the client and stops the cluster, keeping its logs after a
 * failure or with KVMESH_BENCH_KEEP. */
static void cluster_down(local_cluster *lc, kvm_client *c, int rc)
{
	if (c)
		kvm_client_close(c);
	if (!lc)
		return;
	bool keep = rc != 0 || getenv("KVMESH_BENCH_KEEP");
	if (keep)
		fprintf(stderr, "bench-drain: logs in %s\n", local_cluster_dir(lc));
	local_cluster_stop(lc, keep);
}

/* One cluster, one write and one drain. bin_dir: NULL for this build. */
static int run_round(const kvm_model *m, uint32_t n, uint8_t *const *blocks, const uint32_t *tok,
		     const char *bin_dir, round_result *out)
{
	static const char *const coord_flags[] = {"--heartbeat=200ms", "--lend-share=1", NULL};
	static const char *const agent_flags[] = {"--tail-reserve=16", NULL};
	size_t bb = kvm_block_bytes(m);
	uint32_t slots = n + TAIL_RESERVE + 32;
	char pool_s[32];
	snprintf(pool_s, sizeof pool_s, "%" PRIu64, (uint64_t)slots * bb);
	if (bin_dir)
		setenv("KVMESH_BIN_DIR", bin_dir, 1);
	local_cluster *lc;
	kvm_client *c;
	int rc = cluster_up(coord_flags, m, pool_s, agent_flags, &lc, &c);
	if (!lc)
		return -1;
	const char *coord = local_cluster_coordinator(lc);
	/* The fillers take what agent-1 and agent-2 offer (the tail reserve
	 * is not offered), so that wide borrows from agent-3 only. */
	uint32_t offer = slots - TAIL_RESERVE - 1;
	if (rc == 0)
		rc = filler(c, m->id, "filler-1", "agent-1", offer);
	if (rc == 0)
		rc = filler(c, m->id, "filler-2", "agent-2", offer);
	if (rc == 0 && (rc = kvm_seq_create(c, m->id, "wide", NULL, 0, "agent-1", NULL)) == 0)
		rc = kvm_seq_extend(c, "wide", n * BT, NULL);
	double t0 = now_s();
	if (rc == 0)
		rc = kvm_seq_write_blocks(c, "wide", tok, n, (const void *const *)blocks, NULL);
	out->write_s = now_s() - t0;
	if (rc == 0)
		rc = kvm_seq_release(c, "filler-1");
	if (rc == 0)
		rc = kvm_seq_release(c, "filler-2");
	if (rc == 0)
		rc = blocks_on(c, "wide", "agent-3", n, &out->moved);
	if (rc) {
		fprintf(stderr, "bench-drain: setup: %s\n", c ? kvm_client_error(c) : kvm_strerror(rc));
		goto out;
	}
	fprintf(stderr, "bench-drain: %s: wrote %u blocks (%.0f MiB) in %.3f s, %u of them on agent-3\n",
		bin_dir ? "B" : "this build", n, (double)n * bb / 1048576, out->write_s, out->moved);
	/* The drain, timed from the call to the first poll that finds nothing
	 * left (10 ms polls). */
	uint64_t left = 1;
	t0 = now_s();
	rc = demo_node_admin(coord, NULL, "DrainNode", "agent-3");
	while (rc == 0 && left) {
		demo_node nd;
		if ((rc = demo_find_node(coord, NULL, "agent-3", &nd)) != 0 || !(left = nd.drain_left))
			break;
		if (now_s() - t0 > 600) {
			fprintf(stderr, "bench-drain: %" PRIu64 " blocks still on agent-3 after 600 s\n", left);
			rc = -1;
			break;
		}
		usleep(10000);
	}
	out->drain_s = now_s() - t0;
	if (rc)
		goto out;
	/* Correctness: nothing of wide is left there, the bytes are the same. */
	uint32_t on3;
	if ((rc = blocks_on(c, "wide", "agent-3", n, &on3)) == 0 && on3) {
		fprintf(stderr, "bench-drain: %u blocks of wide still on agent-3\n", on3);
		rc = -1;
	}
	uint8_t **back = calloc(n, sizeof *back);
	for (uint32_t i = 0; rc == 0 && i < n; i++)
		if (!back || !(back[i] = malloc(bb)))
			rc = -ENOMEM;
	if (rc == 0 && (rc = kvm_seq_read_blocks(c, "wide", 0, n, (void *const *)back)) != 0)
		fprintf(stderr, "bench-drain: read back: %s\n", kvm_client_error(c));
	for (uint32_t i = 0; rc == 0 && i < n; i++)
		if (memcmp(back[i], blocks[i], bb) != 0) {
			fprintf(stderr, "bench-drain: block %u differs after the drain\n", i);
			rc = -1;
		}
	for (uint32_t i = 0; back && i < n; i++)
		free(back[i]);
	free(back);
	fprintf(stderr, "bench-drain: %s: drained %u blocks in %.3f s (%.0f blocks/s)%s\n",
		bin_dir ? "B" : "this build", out->moved, out->drain_s, out->moved / out->drain_s,
		rc ? "" : ", read back equal");
out:
	cluster_down(lc, c, rc);
	return rc ? -1 : 0;
}

/* ---- Hand-off: a drained home's sequences go to other agents ------------------ */

#define HO_SEQS 32
#define HO_BT 16u

/* Sorts v and returns its p-th percentile. */
static double pct(double *v, int n, int p)
{
	qsort(v, (size_t)n, sizeof *v, cmp_double);
	return percentile(v, (size_t)n, p);
}

/* HO_SEQS sequences homed on agent-1, each with 3 full blocks and 5 tokens
 * in its tail; decode steps of all of them in one batch, timed, first
 * steady, then from DrainNode(agent-1) until it is drained. The floor: the
 * coordinator sends commands on heartbeats (200 ms here). */
static int run_handoff(void)
{
	static const char *const coord_flags[] = {"--heartbeat=200ms", NULL};
	static const char *const agent_flags[] = {"--tail-reserve=64", NULL};
	const kvm_model m = {.id = "bench-handoff", .layers = 1, .q_heads = 8, .kv_heads = 2,
			     .head_dim = 64, .block_tokens = HO_BT, .dtype = KVM_F16};
	size_t row = (size_t)m.kv_heads * m.head_dim * 2, qn = (size_t)m.q_heads * m.head_dim;
	char id[HO_SEQS][16];
	local_cluster *lc;
	kvm_client *c;
	int rc = cluster_up(coord_flags, &m, "64MiB", agent_flags, &lc, &c);
	if (!lc)
		return -1;
	const char *coord = local_cluster_coordinator(lc);
	uint8_t *kv = calloc(3 * HO_BT + 5, row);
	float *q = calloc(HO_SEQS * qn, sizeof *q), *o = calloc(HO_SEQS * qn, sizeof *o),
	      *lse = calloc(HO_SEQS * m.q_heads, sizeof *lse);
	uint8_t *knew = calloc(HO_SEQS, row);
	kvm_attend at[HO_SEQS];
	if (!kv || !q || !o || !lse || !knew)
		rc = -ENOMEM;
	for (uint32_t i = 0; kv && i < (3 * HO_BT + 5) * row; i++)
		kv[i] = (uint8_t)(i * 7 % 61); /* small fp16 values */
	for (int i = 0; rc == 0 && i < HO_SEQS; i++) {
		snprintf(id[i], sizeof id[i], "ho-%d", i);
		if ((rc = kvm_seq_create(c, m.id, id[i], NULL, 0, "agent-1", NULL)) == 0)
			rc = kvm_append_kv(c, id[i], 0, 3 * HO_BT + 5, kv, kv);
		at[i] = (kvm_attend){.seq_id = id[i], .q = q + i * qn, .k_new = knew + i * row,
				     .v_new = knew + i * row, .o = o + i * qn,
				     .lse = lse + i * m.q_heads};
	}
	if (rc) {
		fprintf(stderr, "bench-drain: hand-off setup: %s\n", c ? kvm_client_error(c) : kvm_strerror(rc));
		goto out;
	}
	enum { STEADY = 30, MAX_DURING = 2000 };
	double steady[STEADY], *during = calloc(MAX_DURING, sizeof *during);
	int n_during = 0;
	for (int s = 0; rc == 0 && s < 3; s++) /* warm-up: connections, caches */
		rc = kvm_attend_append(c, 0, 0, at, HO_SEQS);
	for (int s = 0; rc == 0 && s < STEADY; s++) {
		double t = now_s();
		rc = kvm_attend_append(c, 0, 0, at, HO_SEQS);
		steady[s] = (now_s() - t) * 1e3;
	}
	double t0 = now_s(), handed = 0, drained = 0;
	if (rc == 0)
		rc = demo_node_admin(coord, NULL, "DrainNode", "agent-1");
	while (rc == 0 && n_during < MAX_DURING && !drained) {
		double t = now_s();
		rc = kvm_attend_append(c, 0, 0, at, HO_SEQS);
		during[n_during++] = (now_s() - t) * 1e3;
		demo_node nd;
		if (rc == 0 && (rc = demo_find_node(coord, NULL, "agent-1", &nd)) == 0) {
			if (!handed && nd.drain_homes == 0)
				handed = now_s() - t0;
			if (!nd.drain_homes && !nd.drain_left)
				drained = now_s() - t0;
		}
		if (now_s() - t0 > 120) {
			fprintf(stderr, "bench-drain: agent-1 not drained after 120 s\n");
			rc = -1;
		}
	}
	if (rc) {
		fprintf(stderr, "bench-drain: hand-off: %s\n", kvm_client_error(c));
	} else {
		double mid = pct(steady, STEADY, 50), top = pct(steady, STEADY, 100);
		double dmid = pct(during, n_during, 50), dtop = pct(during, n_during, 100);
		fprintf(stderr, "bench-drain: hand-off of %d sequences: all handed off %.3f s after "
			"DrainNode, drained %.3f s; %d decode steps meanwhile\n", HO_SEQS, handed,
			drained, n_during);
		printf("handoff_sequences=%d\n", HO_SEQS);
		printf("handoff_s=%.3f\n", handed);
		printf("handoff_drained_s=%.3f\n", drained);
		printf("handoff_heartbeat_s=0.200\n");
		printf("handoff_decode_steady_p50_ms=%.2f\n", mid);
		printf("handoff_decode_steady_max_ms=%.2f\n", top);
		printf("handoff_decode_during_p50_ms=%.2f\n", dmid);
		printf("handoff_decode_during_max_ms=%.2f\n", dtop);
	}
	free(during);
out:
	free(kv);
	free(q);
	free(o);
	free(lse);
	free(knew);
	cluster_down(lc, c, rc);
	return rc ? -1 : 0;
}

int main(void)
{
	uint32_t n = (uint32_t)env_u64("KVMESH_BENCH_BLOCKS", 2048);
	int rounds = (int)env_u64("KVMESH_BENCH_ROUNDS", 1);
	const char *bin_b = getenv("KVMESH_BENCH_BIN_DIR_B");
	const char *bin_a = getenv("KVMESH_BIN_DIR");
	if (n < 1 || n > 1000000 || rounds < 1 || rounds > 100) {
		fprintf(stderr, "bench-drain: KVMESH_BENCH_BLOCKS must be 1..1000000, rounds 1..100\n");
		return 2;
	}
	kvm_model m = {.id = "bench-drain", .layers = 1, .q_heads = 32, .kv_heads = 8, .head_dim = 128,
		       .block_tokens = BT, .dtype = KVM_F16};
	size_t bb = kvm_block_bytes(&m);
	uint8_t **blocks = calloc(n, sizeof *blocks);
	uint32_t *tok = malloc((size_t)n * BT * sizeof *tok);
	if (!blocks || !tok)
		return 1;
	uint64_t s = 7;
	for (uint32_t i = 0; i < n; i++) {
		if (!(blocks[i] = malloc(bb)))
			return 1;
		for (size_t k = 0; k < bb / 8; k++) {
			s = s * 6364136223846793005ull + 1442695040888963407ull;
			memcpy(blocks[i] + 8 * k, &s, 8);
		}
	}
	for (uint32_t i = 0; i < n * BT; i++)
		tok[i] = i * 2654435761u;
	double *drain = calloc((size_t)rounds, sizeof(double)), *wr = calloc((size_t)rounds, sizeof(double));
	double *drain_b = calloc((size_t)rounds, sizeof(double)), *wr_b = calloc((size_t)rounds, sizeof(double));
	double *speedup = calloc((size_t)rounds, sizeof(double));
	uint32_t moved = 0;
	for (int r = 0; r < rounds; r++) {
		round_result a, b;
		if (bin_b) {
			if (run_round(&m, n, blocks, tok, bin_b, &b) != 0)
				return 1;
			drain_b[r] = b.drain_s;
			wr_b[r] = (double)n * bb / 1048576 / b.write_s;
			if (bin_a)
				setenv("KVMESH_BIN_DIR", bin_a, 1);
			else
				unsetenv("KVMESH_BIN_DIR");
		}
		if (run_round(&m, n, blocks, tok, NULL, &a) != 0)
			return 1;
		drain[r] = a.drain_s;
		wr[r] = (double)n * bb / 1048576 / a.write_s;
		moved = a.moved;
		if (bin_b)
			speedup[r] = b.drain_s / a.drain_s;
	}
	double d = median(drain, rounds), w = median(wr, rounds);
	double mib = (double)moved * bb / 1048576;
	printf("drain_blocks=%u\n", moved);
	printf("drain_s=%.3f\n", d);
	printf("drain_blocks_per_s=%.0f\n", moved / d);
	printf("drain_MiB_per_s=%.1f\n", mib / d);
	printf("write_MiB_per_s=%.1f\n", w);
	printf("drain_vs_write=%.3f\n", mib / d / w);
	if (bin_b) {
		double db = median(drain_b, rounds), wb = median(wr_b, rounds);
		printf("b_drain_s=%.3f\n", db);
		printf("b_drain_vs_write=%.3f\n", mib / db / wb);
		printf("drain_speedup_vs_b=%.2f\n", median(speedup, rounds));
	}
	fflush(stdout);
	return run_handoff() == 0 ? 0 : 1;
}
