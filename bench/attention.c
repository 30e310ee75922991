/* make bench-attention: DistAttention through a real local cluster against
 * the local kernel on the same data, in the same run.
 *
 * One long sequence (256K tokens by default, fp16, GQA 32/8, head_dim 128,
 * one layer) is written to three agents (the home holds about a third, the
 * rest is borrowed). Then rounds alternate: one kvm_attend_append through
 * the cluster (append a token, attention where the blocks live, merge), and
 * da_partial_cpu in this process over a local copy of the same blocks with
 * all threads. The per-round ratio of the two times is the overhead; its
 * median is reported. The network bytes come from the agents' data-plane
 * counters and the client's, and are compared with the KV bytes of the
 * blocks that are not on the home (what moving the KV would cost).
 *
 * Then a batch: eight sequences of 8K tokens (fewer for short runs) on the same agents, one
 * kvm_attend_append for all of them per step, against one da_partial_cpu
 * call over the same eight sequences.
 *
 * Environment: KVMESH_BENCH_TOKENS (default 262144), KVMESH_BENCH_ROUNDS (9).
 * Final lines: attend_cluster_ms, attend_local_ms, attend_cluster_overhead,
 * attend_net_bytes, attend_moved_kv_bytes, attend_bytes_ratio,
 * attend_batch_cluster_qps, attend_batch_local_qps, attend_batch_overhead. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench_util.h"
#include "client/demo/launch.h"
#include "client/demo/nodes.h"
#include "client/kvmesh.h"
#include "kernels/distattn.h"

/* Sum of the agents' data-plane byte counters (Agent.Stats); -1 if none. */
static double agents_data_bytes(local_cluster *lc)
{
	demo_node nodes[LC_MAX_AGENTS];
	int n = demo_list_nodes(local_cluster_coordinator(lc), local_cluster_token(lc), true, nodes, LC_MAX_AGENTS);
	double sum = -1;
	for (int i = 0; i < n && i < LC_MAX_AGENTS; i++)
		if (nodes[i].data_bytes >= 0)
			sum = (sum < 0 ? 0 : sum) + nodes[i].data_bytes;
	return sum;
}

/* Fills a block with random fp16 values in [-1, 1). */
static void fill_block(uint16_t *b, size_t n, uint64_t *s)
{
	for (size_t i = 0; i < n; i++) {
		*s = *s * 6364136223846793005ull + 1442695040888963407ull;
		_Float16 h = (_Float16)((double)(*s >> 11) / 4503599627370496.0 - 1.0);
		memcpy(&b[i], &h, 2);
	}
}

typedef struct bench_seq {
	char id[32];
	uint8_t **blocks;
	uint32_t n_blocks, tokens;
} bench_seq;

/* Creates a sequence of `tokens` tokens (a multiple of block_tokens) homed on
 * `home` and writes its blocks. */
static int make_seq(kvm_client *c, const kvm_model *m, bench_seq *s, const char *id, const char *home,
		    uint32_t tokens, uint64_t seed)
{
	size_t bb = kvm_block_bytes(m);
	snprintf(s->id, sizeof(s->id), "%s", id);
	s->n_blocks = tokens / m->block_tokens;
	s->tokens = tokens;
	s->blocks = calloc(s->n_blocks + 1, sizeof(*s->blocks));
	uint32_t *tok = malloc((size_t)tokens * sizeof(uint32_t));
	if (!s->blocks || !tok)
		return -ENOMEM;
	for (uint32_t i = 0; i < tokens; i++)
		tok[i] = (uint32_t)(seed * 1000003u + i);
	for (uint32_t b = 0; b < s->n_blocks; b++) {
		if (!(s->blocks[b] = malloc(bb)))
			return -ENOMEM;
		fill_block((uint16_t *)s->blocks[b], bb / 2, &seed);
	}
	/* The block the appended tokens go to, for the local run. */
	if (!(s->blocks[s->n_blocks] = calloc(1, bb)))
		return -ENOMEM;
	int rc = kvm_seq_create(c, m->id, id, NULL, 0, home, NULL);
	/* Write in slices so that progress shows. */
	for (uint32_t done = 0; rc == 0 && done < s->n_blocks;) {
		uint32_t n = s->n_blocks - done < 256 ? s->n_blocks - done : 256;
		uint32_t w;
		rc = kvm_seq_write_blocks(c, id, tok, done + n, (const void *const *)s->blocks, &w);
		done += n;
		fprintf(stderr, "\rbench-attention: writing %s: %u/%u blocks", id, done, s->n_blocks);
	}
	fputc('\n', stderr);
	free(tok);
	return rc;
}

int main(void)
{
	uint32_t tokens = (uint32_t)env_u64("KVMESH_BENCH_TOKENS", 262144);
	int rounds = (int)env_u64("KVMESH_BENCH_ROUNDS", 9);
	kvm_model m = {.id = "bench-gqa", .layers = 1, .q_heads = 32, .kv_heads = 8, .head_dim = 128,
		       .block_tokens = 64, .dtype = KVM_F16};
	tokens -= tokens % m.block_tokens;
	if (tokens < 3 * m.block_tokens || rounds < 1 || rounds > 1000) {
		fprintf(stderr, "bench-attention: KVMESH_BENCH_TOKENS must be at least %u and rounds 1..1000\n",
			3 * m.block_tokens);
		return 2;
	}
	size_t bb = kvm_block_bytes(&m);
	uint32_t batch = 8, batch_tokens = tokens / 32 < 8192 ? tokens / 32 : 8192;
	batch_tokens -= batch_tokens % m.block_tokens;
	double kv_bytes = (double)tokens * 2 * kvm_row_bytes(&m);
	/* Pools of a third of everything (plus room for tails): the long
	 * sequence fills its home and borrows the rest from the two others,
	 * which may lend all they have. */
	uint64_t blocks = tokens / m.block_tokens + (uint64_t)batch * (batch_tokens / m.block_tokens + 1);
	uint64_t pool = (blocks / 3 + 40) * bb;
	char pool_s[32], err[2048];
	snprintf(pool_s, sizeof(pool_s), "%" PRIu64, pool);
	const char *coord_flags[] = {"--lend-share=1", NULL};
	local_cluster *lc;
	if (local_cluster_start(coord_flags, &lc, err, sizeof(err)) != 0) {
		fprintf(stderr, "bench-attention: %s\n", err);
		return 1;
	}
	kvm_client *c;
	int rc = kvm_client_open(local_cluster_coordinator(lc), NULL, &c);
	if (rc == 0)
		rc = kvm_model_register(c, &m);
	const char *agent_flags[] = {"--tail-reserve=16", NULL};
	if (rc == 0 && (rc = local_cluster_add_agents(lc, 3, m.id, pool_s, agent_flags, err, sizeof(err))) != 0)
		fprintf(stderr, "bench-attention: %s\n", err);
	bench_seq big = {0};
	if (rc == 0)
		rc = make_seq(c, &m, &big, "long", "agent-1", tokens, 1);
	kvm_seq_info info = {0};
	if (rc == 0)
		rc = kvm_seq_get(c, "long", &info);
	if (rc) {
		fprintf(stderr, "bench-attention: setup: %s\n", c ? kvm_client_error(c) : kvm_strerror(rc));
		local_cluster_stop(lc, 1);
		return 1;
	}
	fprintf(stderr, "bench-attention: %u tokens (%.0f MiB of KV) in %u blocks, %u of them on agents other "
			"than the home\n",
		tokens, kv_bytes / 1048576, info.blocks, info.borrowed_blocks);

	da_ctx *ctx;
	if ((rc = da_ctx_create(0, &ctx)) != 0)
		return 1;
	uint32_t QD = m.q_heads * m.head_dim;
	float *q = malloc(QD * 4), *o = malloc(QD * 4), *lse = malloc(m.q_heads * 4);
	float *lo = malloc(QD * 4), *ll = malloc(m.q_heads * 4);
	uint64_t seed = 5;
	for (uint32_t i = 0; i < QD; i++) {
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		q[i] = (float)((double)(seed >> 11) / 4503599627370496.0 - 1.0);
	}
	size_t row = kvm_row_bytes(&m);
	uint8_t *krow = calloc(1, row), *vrow = calloc(1, row);
	double *t_cluster = calloc((size_t)rounds, sizeof(double)), *t_local = calloc((size_t)rounds, sizeof(double));
	double *ratio = calloc((size_t)rounds, sizeof(double));
	/* One round first, not counted: connections, the home's first lookup. */
	{
		kvm_attend a = {.seq_id = "long", .q = q, .k_new = krow, .v_new = vrow, .o = o, .lse = lse};
		if ((rc = kvm_attend_append(c, 0, 0, &a, 1)) != 0) {
			fprintf(stderr, "bench-attention: attend_append: %s\n", kvm_client_error(c));
			local_cluster_stop(lc, 1);
			return 1;
		}
		big.tokens++;
	}
	double net0 = agents_data_bytes(lc);
	kvm_client_stats cs0, cs1;
	kvm_client_get_stats(c, &cs0);
	double max_err = 0;
	for (int r = 0; r < rounds; r++) {
		kvm_attend a = {.seq_id = "long", .q = q, .k_new = krow, .v_new = vrow, .o = o, .lse = lse};
		double t0 = now_s();
		if ((rc = kvm_attend_append(c, 0, 0, &a, 1)) != 0) {
			fprintf(stderr, "bench-attention: attend_append: %s\n", kvm_client_error(c));
			break;
		}
		t_cluster[r] = now_s() - t0;
		/* The same tokens locally: the prompt plus the zero rows appended. */
		uint32_t nt = big.tokens + (uint32_t)r + 1, nb = (nt + m.block_tokens - 1) / m.block_tokens;
		uint32_t start[2] = {0, nb};
		da_shape s = {.q_heads = m.q_heads, .kv_heads = m.kv_heads, .head_dim = m.head_dim,
			      .block_tokens = m.block_tokens, .layer = 0, .kv_dtype = DA_F16,
			      .scale = 1.0f / sqrtf((float)m.head_dim)};
		da_batch b = {.n_queries = 1, .q = q, .blocks = (const void *const *)big.blocks, .block_start = start,
			      .n_tokens = &nt, .max_blocks = nb};
		t0 = now_s();
		if ((rc = da_partial_cpu(ctx, &s, &b, lo, ll)) != 0)
			break;
		t_local[r] = now_s() - t0;
		ratio[r] = t_cluster[r] / t_local[r];
		for (uint32_t i = 0; i < QD; i++)
			max_err = fmax(max_err, fabs((double)o[i] - lo[i]));
		fprintf(stderr, "round %d: cluster %.2f ms, local %.2f ms, ratio %.2f\n", r + 1, t_cluster[r] * 1e3,
			t_local[r] * 1e3, ratio[r]);
	}
	double net1 = agents_data_bytes(lc);
	kvm_client_get_stats(c, &cs1);
	if (rc) {
		local_cluster_stop(lc, 1);
		return 1;
	}
	/* Every data-plane byte crosses one agent's data server once: the
	 * client's requests and replies at the home, the home's at its peers;
	 * so the agents' server counters add up to the traffic. */
	double net = net0 >= 0 && net1 >= 0 ? net1 - net0
					    : (double)(cs1.data_bytes_in + cs1.data_bytes_out - cs0.data_bytes_in -
						       cs0.data_bytes_out);
	double per_call = net / rounds;
	double moved = (double)info.borrowed_blocks * bb; /* one layer: the whole block */
	double cl = median(t_cluster, rounds), lo_t = median(t_local, rounds), ov = median(ratio, rounds);
	fprintf(stderr, "bench-attention: max |o_cluster - o_local| = %.2e%s\n", max_err,
		net0 < 0 ? " (agents have no data-plane counters: client bytes only)" : "");

	/* The batch: eight shorter sequences, homes round robin. */
	bench_seq bs[8];
	const char *homes[] = {"agent-1", "agent-2", "agent-3"};
	for (uint32_t i = 0; i < batch && rc == 0; i++) {
		char id[32];
		snprintf(id, sizeof(id), "batch-%u", i);
		rc = make_seq(c, &m, &bs[i], id, homes[i % 3], batch_tokens, 100 + i);
	}
	double qps_cluster = 0, qps_local = 0;
	if (rc == 0) {
		float *qb = malloc((size_t)batch * QD * 4), *ob = malloc((size_t)batch * QD * 4);
		float *lb = malloc((size_t)batch * m.q_heads * 4);
		for (uint32_t i = 0; i < batch; i++)
			memcpy(qb + (size_t)i * QD, q, QD * 4);
		kvm_attend a[8];
		int steps = rounds * 2;
		double tc = 0, tl = 0;
		const void **lists = malloc((size_t)batch * (batch_tokens / m.block_tokens + 4) * sizeof(void *));
		uint32_t start[9], ntok[8];
		for (int st = 0; st < steps && rc == 0; st++) {
			for (uint32_t i = 0; i < batch; i++)
				a[i] = (kvm_attend){.seq_id = bs[i].id, .q = qb + (size_t)i * QD, .k_new = krow,
						    .v_new = vrow, .o = ob + (size_t)i * QD, .lse = lb + (size_t)i * m.q_heads};
			double t0 = now_s();
			rc = kvm_attend_append(c, 0, 0, a, batch);
			tc += now_s() - t0;
			uint32_t at = 0;
			for (uint32_t i = 0; i < batch; i++) {
				start[i] = at;
				ntok[i] = bs[i].tokens + (uint32_t)st + 1;
				for (uint32_t k = 0; k < (ntok[i] + m.block_tokens - 1) / m.block_tokens; k++)
					lists[at++] = bs[i].blocks[k];
			}
			start[batch] = at;
			da_shape s = {.q_heads = m.q_heads, .kv_heads = m.kv_heads, .head_dim = m.head_dim,
				      .block_tokens = m.block_tokens, .layer = 0, .kv_dtype = DA_F16,
				      .scale = 1.0f / sqrtf((float)m.head_dim)};
			da_batch b = {.n_queries = batch, .q = qb, .blocks = lists, .block_start = start,
				      .n_tokens = ntok, .max_blocks = batch_tokens / m.block_tokens + 1};
			float *lo_b = malloc((size_t)batch * QD * 4), *ll_b = malloc((size_t)batch * m.q_heads * 4);
			t0 = now_s();
			if (da_partial_cpu(ctx, &s, &b, lo_b, ll_b) != 0)
				rc = -EIO;
			tl += now_s() - t0;
			free(lo_b), free(ll_b);
		}
		if (rc)
			fprintf(stderr, "bench-attention: batch: %s\n", kvm_client_error(c));
		qps_cluster = steps * batch / tc;
		qps_local = steps * batch / tl;
		free(qb), free(ob), free(lb), free(lists);
	}
	printf("attend_tokens=%u\n", tokens);
	printf("attend_cluster_ms=%.3f\n", cl * 1e3);
	printf("attend_local_ms=%.3f\n", lo_t * 1e3);
	printf("attend_cluster_kv_gbs=%.2f\n", kv_bytes / cl / 1e9);
	printf("attend_local_kv_gbs=%.2f\n", kv_bytes / lo_t / 1e9);
	printf("attend_net_bytes=%.0f\n", per_call);
	printf("attend_moved_kv_bytes=%.0f\n", moved);
	printf("attend_batch_cluster_qps=%.1f\n", qps_cluster);
	printf("attend_batch_local_qps=%.1f\n", qps_local);
	printf("attend_batch_overhead=%.3f\n", qps_cluster > 0 ? qps_local / qps_cluster : 0);
	printf("attend_cluster_overhead=%.3f\n", ov);
	printf("attend_bytes_ratio=%.6f\n", moved > 0 ? per_call / moved : 0);
	kvm_client_close(c);
	local_cluster_stop(lc, 0);
	da_ctx_destroy(ctx);
	return rc ? 1 : 0;
}
