/* libkvmesh against a real local cluster (a coordinator and agents as child
 * processes): attention across agents equals the local kernel on the same
 * KV, for MHA and GQA in fp32, fp16 and bf16, with sequences on one, two and
 * three agents and shared prefixes; blocks read back byte for byte; a killed
 * or stopped peer gives an error that names it and its blocks, never a wrong
 * result; bad input gets clear errors; a cluster with a shared token serves
 * a client with the token and refuses one without. */
#include <criterion/criterion.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "client/demo/launch.h"
#include "client/demo/nodes.h"
#include "common/rpc.h"
#include "proto/kvmesh.pb-c.h"
#include "client/kvmesh.h"
#include "kernels/distattn.h"
#include "tests/ref_kv.h"
#include "transport/transport.h"

static local_cluster *g_lc;
static kvm_client *g_c;

static void teardown(void)
{
	kvm_client_close(g_c);
	g_c = NULL;
	/* KVMESH_KEEP_LOGS=1 keeps the daemons' logs (the path is in each
	 * failure message of the launcher). */
	local_cluster_stop(g_lc, getenv("KVMESH_KEEP_LOGS") != NULL);
	g_lc = NULL;
}

/* A cluster of n agents of `pool` each, with model m registered; agent_flag
 * (NULL: none) goes to every agent; with token_flag
 * ("--auth-token-file=PATH") every daemon and the client use it. */
static void start_with(unsigned n, const char *pool, const kvm_model *m, int data_timeout_ms,
		       const char *agent_flag, const char *token_flag)
{
	char err[2048];
	const char *coord_flags[] = {"--heartbeat=200ms", "--dead-after=3s", token_flag, NULL};
	cr_assert_eq(local_cluster_start(coord_flags, &g_lc, err, sizeof(err)), 0, "%s", err);
	kvm_client_opts o = {.control_timeout_ms = 5000, .data_timeout_ms = data_timeout_ms,
			     .auth_token_file = token_flag ? strchr(token_flag, '=') + 1 : NULL};
	cr_assert_eq(kvm_client_open(local_cluster_coordinator(g_lc), &o, &g_c), 0);
	cr_assert_eq(kvm_model_register(g_c, m), 0, "%s", kvm_client_error(g_c));
	const char *agent_flags[4] = {"--attend-timeout=1500ms"}; /* NULL-terminated */
	int k = 1;
	if (agent_flag)
		agent_flags[k++] = agent_flag;
	if (token_flag)
		agent_flags[k++] = token_flag;
	cr_assert_eq(local_cluster_add_agents(g_lc, n, m->id, pool, agent_flags, err, sizeof(err)), 0, "%s", err);
}

static void start(unsigned n, const char *pool, const kvm_model *m, int data_timeout_ms)
{
	start_with(n, pool, m, data_timeout_ms, NULL, NULL);
}

/* ---- a sequence's KV kept locally too, for the reference ------------------- */

/* Creates sequence `id` homed on `home`, with a prompt of n_prompt tokens of
 * random KV written back (full blocks) and appended (the rest). */
static void make_seq(ref_seq *r, const kvm_model *m, const char *id, const char *home, const uint32_t *prompt,
		     uint32_t n_prompt, uint64_t seed, kvm_seq_info *info)
{
	memset(r, 0, sizeof(*r));
	r->m = m;
	r->rng = seed;
	for (uint32_t t = 0; t < n_prompt; t++)
		ref_append(r);
	cr_assert_eq(kvm_seq_create(g_c, m->id, id, prompt, n_prompt, home, info), 0, "%s", kvm_client_error(g_c));
	uint32_t full = n_prompt / m->block_tokens, rest = n_prompt % m->block_tokens, written = 0;
	cr_assert_eq(kvm_seq_write_blocks(g_c, id, prompt, full, (const void *const *)r->blocks, &written), 0, "%s",
		     kvm_client_error(g_c));
	cr_assert_eq(written, full - info->shared_prefix_blocks);
	for (uint32_t l = 0; rest && l < m->layers; l++)
		cr_assert_eq(kvm_append_kv(g_c, id, l, rest, ref_row(r, l, full * m->block_tokens, 0),
					   ref_row(r, l, full * m->block_tokens, 1)),
			     0, "%s", kvm_client_error(g_c));
}

static void check_close(const float *a, const float *b, size_t n, double tol, const char *what)
{
	double scale = 0, diff = 0;
	for (size_t i = 0; i < n; i++) {
		cr_assert(isfinite(a[i]), "%s[%zu] is not finite", what, i);
		scale = fmax(scale, fabs(b[i]));
		diff = fmax(diff, fabs((double)a[i] - b[i]));
	}
	cr_assert(diff <= tol * (scale > 1 ? scale : 1), "%s: max difference %.3g (scale %.3g, tol %.1g)", what, diff,
		  scale, tol);
}

/* Decodes `steps` tokens of the sequences together, every layer, checking
 * each answer against the local kernel. */
static void decode_and_check(ref_seq *r, const char *const *ids, uint32_t n, uint32_t steps, double tol)
{
	const kvm_model *m = r[0].m;
	uint32_t QD = m->q_heads * m->head_dim;
	float *q = malloc((size_t)n * QD * 4), *o = malloc((size_t)n * QD * 4), *lse = malloc((size_t)n * m->q_heads * 4);
	float *ro = malloc(QD * 4), *rl = malloc(m->q_heads * 4);
	kvm_attend a[8];
	uint64_t s = 99;
	for (uint32_t step = 0; step < steps; step++) {
		for (uint32_t i = 0; i < n; i++)
			ref_append(&r[i]);
		for (uint32_t l = 0; l < m->layers; l++) {
			for (uint32_t i = 0; i < n; i++) {
				for (uint32_t k = 0; k < QD; k++)
					q[(size_t)i * QD + k] = frand(&s);
				uint32_t pos = r[i].tokens - 1;
				a[i] = (kvm_attend){.seq_id = ids[i], .q = q + (size_t)i * QD, .k_new = ref_row(&r[i], l, pos, 0),
						    .v_new = ref_row(&r[i], l, pos, 1), .o = o + (size_t)i * QD,
						    .lse = lse + (size_t)i * m->q_heads};
			}
			cr_assert_eq(kvm_attend_append(g_c, l, 0, a, n), 0, "step %u layer %u: %s", step, l,
				     kvm_client_error(g_c));
			for (uint32_t i = 0; i < n; i++) {
				cr_assert_eq(ref_attend(&r[i], l, q + (size_t)i * QD, ro, rl), 0);
				check_close(o + (size_t)i * QD, ro, QD, tol, "o");
				check_close(lse + (size_t)i * m->q_heads, rl, m->q_heads, tol, "lse");
			}
		}
	}
	free(q), free(o), free(lse), free(ro), free(rl);
}

static uint32_t *tokens_of(uint32_t n, uint32_t seed)
{
	uint32_t *t = malloc(n * sizeof(uint32_t));
	for (uint32_t i = 0; i < n; i++)
		t[i] = (i * 2654435761u + seed) % 50000;
	return t;
}

/* Blocks of a sequence per node, from the coordinator. */
static uint32_t nodes_holding(const char *id, kvm_seq_info *info)
{
	cr_assert_eq(kvm_seq_get(g_c, id, info), 0);
	return info->borrowed_blocks;
}

TestSuite(client, .fini = teardown, .timeout = 120);

/* GQA in fp16 over three agents: the home fills, the rest is borrowed. */
Test(client, gqa_f16_across_three_agents)
{
	kvm_model m = {.id = "gqa16", .layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64,
		       .block_tokens = 16, .dtype = KVM_F16};
	start(3, "512KiB", &m, 5000); /* 32 blocks of 16 KiB each */
	uint32_t n = 52 * 16 - 5;     /* more than one agent holds */
	uint32_t *prompt = tokens_of(n, 1);
	ref_seq r;
	kvm_seq_info info;
	make_seq(&r, &m, "s1", "agent-1", prompt, n, 7, &info);
	kvm_seq_info now;
	cr_assert_gt(nodes_holding("s1", &now), 0, "no block was borrowed");
	const char *ids[] = {"s1"};
	decode_and_check(&r, ids, 1, 8, 2e-3); /* crosses a block boundary: a seal */
	ref_free(&r);
	free(prompt);
}

Test(client, mha_f32_one_agent)
{
	kvm_model m = {.id = "mha32", .layers = 3, .q_heads = 4, .kv_heads = 4, .head_dim = 32,
		       .block_tokens = 8, .dtype = KVM_F32};
	start(1, "4MiB", &m, 5000);
	uint32_t n = 100;
	uint32_t *prompt = tokens_of(n, 2);
	ref_seq r;
	kvm_seq_info info;
	make_seq(&r, &m, "m1", NULL, prompt, n, 8, &info);
	const char *ids[] = {"m1"};
	decode_and_check(&r, ids, 1, 10, 1e-4);
	ref_free(&r);
	free(prompt);
}

/* bf16, two agents, two sequences in one batch with different homes, the
 * second sharing the first's prompt prefix. */
Test(client, bf16_two_agents_shared_prefix)
{
	kvm_model m = {.id = "bf16", .layers = 2, .q_heads = 6, .kv_heads = 3, .head_dim = 32,
		       .block_tokens = 16, .dtype = KVM_BF16};
	start(2, "1MiB", &m, 5000);
	uint32_t n = 20 * 16 + 3;
	uint32_t *p1 = tokens_of(n, 3), *p2 = tokens_of(n, 3);
	for (uint32_t i = 8 * 16; i < n; i++)
		p2[i] = p1[i] + 1; /* the first 8 blocks are the same prompt */
	ref_seq r[2];
	kvm_seq_info i1, i2;
	make_seq(&r[0], &m, "b1", "agent-1", p1, n, 9, &i1);
	/* The second sequence's shared blocks must hold the same KV as the first's. */
	memset(&r[1], 0, sizeof(r[1]));
	r[1].m = &m;
	r[1].rng = 10;
	for (uint32_t t = 0; t < n; t++)
		ref_append(&r[1]);
	for (uint32_t b = 0; b < 8; b++)
		memcpy(r[1].blocks[b], r[0].blocks[b], kvm_block_bytes(&m));
	cr_assert_eq(kvm_seq_create(g_c, m.id, "b2", p2, n, "agent-2", &i2), 0, "%s", kvm_client_error(g_c));
	cr_assert_eq(i2.shared_prefix_blocks, 8);
	uint32_t written;
	cr_assert_eq(kvm_seq_write_blocks(g_c, "b2", p2, n / 16, (const void *const *)r[1].blocks, &written), 0);
	cr_assert_eq(written, n / 16 - 8, "shared blocks were written again");
	uint32_t full = n / 16;
	for (uint32_t l = 0; l < m.layers; l++)
		cr_assert_eq(kvm_append_kv(g_c, "b2", l, n % 16, ref_row(&r[1], l, full * 16, 0),
					   ref_row(&r[1], l, full * 16, 1)),
			     0, "%s", kvm_client_error(g_c));
	uint32_t matched = 0;
	cr_assert_eq(kvm_match_prefix(g_c, m.id, p1, n, &matched), 0);
	cr_assert_eq(matched, full);
	const char *ids[] = {"b1", "b2"};
	decode_and_check(r, ids, 2, 4, 2e-3);
	ref_free(&r[0]);
	ref_free(&r[1]);
	free(p1), free(p2);
}

Test(client, read_blocks_back)
{
	kvm_model m = {.id = "rd", .layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
		       .block_tokens = 16, .dtype = KVM_F16};
	start(2, "512KiB", &m, 5000);
	uint32_t n = 40 * 16;
	uint32_t *prompt = tokens_of(n, 4);
	ref_seq r;
	kvm_seq_info info;
	make_seq(&r, &m, "r1", "agent-1", prompt, n, 11, &info);
	size_t bb = kvm_block_bytes(&m);
	void *bufs[40];
	for (int i = 0; i < 40; i++)
		bufs[i] = malloc(bb);
	cr_assert_eq(kvm_seq_read_blocks(g_c, "r1", 0, 40, bufs), 0, "%s", kvm_client_error(g_c));
	for (int i = 0; i < 40; i++) {
		cr_assert_eq(memcmp(bufs[i], r.blocks[i], bb), 0, "block %d differs", i);
		free(bufs[i]);
	}
	/* The block map: 40 written blocks, on agent-1 or borrowed from agent-2. */
	kvm_block_info bi[64];
	uint32_t total = 0, borrowed = 0;
	cr_assert_eq(kvm_seq_blocks(g_c, "r1", bi, 64, &total), 0);
	cr_assert_eq(total, 40);
	for (uint32_t i = 0; i < total; i++) {
		cr_assert_eq(bi[i].index, i);
		cr_assert(bi[i].written, "block %u has no handle", i);
		cr_assert_str_eq(bi[i].node, bi[i].borrowed ? "agent-2" : "agent-1");
		borrowed += bi[i].borrowed;
	}
	cr_assert_gt(borrowed, 0);
	void *one = malloc(bb);
	cr_assert_eq(kvm_seq_read_blocks(g_c, "r1", 40, 1, &one), -ERANGE);
	free(one);
	ref_free(&r);
	free(prompt);
}

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* A peer dies during decode: the sequence that needs it fails with an error
 * naming the node and its blocks; a sequence that does not need it goes on. */
static void peer_fault(int sig)
{
	kvm_model m = {.id = "fault", .layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
		       .block_tokens = 16, .dtype = KVM_F16};
	start(3, "256KiB", &m, 5000); /* 32 blocks of 8 KiB */
	uint32_t n = 50 * 16;
	uint32_t *p1 = tokens_of(n, 5), *p2 = tokens_of(64, 6);
	ref_seq r[2];
	kvm_seq_info i1, i2;
	make_seq(&r[0], &m, "wide", "agent-1", p1, n, 12, &i1);
	make_seq(&r[1], &m, "narrow", "agent-2", p2, 64, 13, &i2);
	kvm_seq_info now;
	cr_assert_eq(nodes_holding("narrow", &now), 0);
	/* Find a creditor of "wide" other than narrow's home. */
	cr_assert_gt(nodes_holding("wide", &now), 0);
	kvm_block_info bi[64];
	uint32_t total = 0, on_victim = 0;
	cr_assert_eq(kvm_seq_blocks(g_c, "wide", bi, 64, &total), 0);
	for (uint32_t i = 0; i < total && i < 64; i++)
		on_victim += strcmp(bi[i].node, "agent-3") == 0;
	cr_assert_gt(on_victim, 0, "no block of the sequence is on agent-3");
	const char *ids[] = {"wide", "narrow"};
	decode_and_check(r, ids, 2, 1, 2e-3);
	cr_assert_eq(local_cluster_signal_agent(g_lc, 2, sig), 0);
	uint32_t QD = m.q_heads * m.head_dim;
	float q[2][256] = {{0}}, o[2][256], lse[2][4];
	ref_append(&r[0]);
	ref_append(&r[1]);
	kvm_attend a[2];
	for (int i = 0; i < 2; i++)
		a[i] = (kvm_attend){.seq_id = ids[i], .q = q[i], .k_new = ref_row(&r[i], 0, r[i].tokens - 1, 0),
				    .v_new = ref_row(&r[i], 0, r[i].tokens - 1, 1), .o = o[i], .lse = lse[i]};
	(void)QD;
	double t0 = now_s();
	int rc = kvm_attend_append(g_c, 0, 0, a, 2);
	double took = now_s() - t0;
	cr_assert_neq(rc, 0, "a decode step over a dead peer succeeded");
	cr_assert_neq(a[0].status, 0);
	cr_assert_eq(a[1].status, 0, "the sequence without blocks on the dead peer failed too: %s",
		     kvm_strerror(a[1].status));
	const char *msg = kvm_client_error(g_c);
	cr_assert(strstr(msg, "agent-3") && strstr(msg, "blocks"), "the error does not name the peer: %s", msg);
	cr_assert_lt(took, 8.0, "the failure took %.1f s", took);
	if (sig == SIGSTOP)
		local_cluster_signal_agent(g_lc, 2, SIGCONT);
	ref_free(&r[0]);
	ref_free(&r[1]);
	free(p1), free(p2);
}

Test(client, killed_peer_is_named)
{
	peer_fault(SIGKILL);
}

Test(client, stopped_peer_hits_the_deadline)
{
	peer_fault(SIGSTOP);
}

Test(client, bad_input)
{
	kvm_model m = {.id = "bad", .layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 32,
		       .block_tokens = 16, .dtype = KVM_F16};
	start(1, "1MiB", &m, 5000);
	kvm_model other = m;
	other.layers = 3;
	cr_assert_eq(kvm_model_register(g_c, &other), -EEXIST);
	cr_assert_eq(kvm_model_register(g_c, &m), 0, "registering the same model again");
	kvm_seq_info info;
	cr_assert_eq(kvm_seq_create(g_c, "no-such-model", "x", NULL, 0, NULL, &info), -ENOENT);
	cr_assert_eq(kvm_seq_get(g_c, "no-such-seq", &info), -ENOENT);
	cr_assert(strlen(kvm_client_error(g_c)) > 0);
	float q[128] = {0}, o[128], lse[4];
	uint16_t k[64] = {0}, v[64] = {0};
	kvm_attend a = {.seq_id = "no-such-seq", .q = q, .k_new = k, .v_new = v, .o = o, .lse = lse};
	cr_assert_eq(kvm_attend_append(g_c, 0, 0, &a, 1), -ENOENT);
	cr_assert_eq(kvm_seq_create(g_c, m.id, "ok", NULL, 0, NULL, &info), 0);
	cr_assert_eq(kvm_attend_append(g_c, 5, 0, &a, 1) < 0, 1);
	a.seq_id = "ok";
	cr_assert_eq(kvm_attend_append(g_c, 2, 0, &a, 1), -EINVAL, "layer out of range");
	a.q = NULL;
	cr_assert_eq(kvm_attend_append(g_c, 0, 0, &a, 1), -EINVAL);
	cr_assert_eq(kvm_attend_append(g_c, 0, 0, NULL, 0), -EINVAL);
	cr_assert_eq(kvm_append_kv(g_c, "ok", 0, 0, k, v), -EINVAL);
	cr_assert_eq(kvm_seq_release(g_c, "ok"), 0);
	cr_assert_eq(kvm_seq_release(g_c, "ok"), -ENOENT);
}

/* The node as the coordinator lists it. */
static demo_node node_now(const char *id)
{
	demo_node nd;
	int rc = demo_find_node(local_cluster_coordinator(g_lc), NULL, id, &nd);
	cr_assert_eq(rc, 0, "ListNodes: %s: %s", id, strerror(-rc));
	return nd;
}

/* One of agent i's Stats counters. */
static double agent_counter(unsigned i, const char *name)
{
	kvm_rpc_channel *ch;
	cr_assert_eq(kvm_rpc_channel_open(local_cluster_agent_grpc(g_lc, i), &ch), 0);
	Kvmesh__V1__StatsRequest r = KVMESH__V1__STATS_REQUEST__INIT;
	uint8_t buf[16];
	size_t n = kvmesh__v1__stats_request__pack(&r, buf);
	void *resp = NULL;
	size_t len = 0;
	kvm_rpc_status st;
	cr_assert_eq(kvm_rpc_unary(ch, "/kvmesh.v1.Agent/Stats", buf, n, 5000, &resp, &len, &st), 0);
	cr_assert_eq(st.code, KVM_RPC_OK, "Stats: %s", st.message);
	kvm_rpc_channel_close(ch);
	Kvmesh__V1__StatsResponse *s = kvmesh__v1__stats_response__unpack(NULL, len, resp);
	free(resp);
	cr_assert(s);
	double v = -1;
	for (size_t k = 0; k < s->n_counters; k++)
		if (strcmp(s->counters[k]->key, name) == 0)
			v = s->counters[k]->value;
	kvmesh__v1__stats_response__free_unpacked(s, NULL);
	cr_assert_geq(v, 0, "no counter %s", name);
	return v;
}

/* Written blocks of seq on node (placements not written yet do not count). */
static uint32_t blocks_on(const char *seq, const char *node, uint32_t *total)
{
	kvm_block_info bi[128];
	*total = 0;
	cr_assert_eq(kvm_seq_blocks(g_c, seq, bi, 128, total), 0, "%s", kvm_client_error(g_c));
	uint32_t on = 0;
	for (uint32_t i = 0; i < *total && i < 128; i++)
		on += bi[i].written && strcmp(bi[i].node, node) == 0;
	return on;
}

/* Draining a node moves the blocks that other nodes' sequences keep there
 * to other nodes, and hands the sequences homed there to other agents:
 * decode goes on with the same results (a home finds the blocks' new places
 * when the old ones are gone; the client follows a sequence to its new
 * home), and once drained the node can be killed without degrading
 * anything. */
/* "wide" homed on agent-1 with blocks on agent-3, "on3" homed on agent-3;
 * one decode step checked. A filler takes half the home first, so that
 * "wide" borrows from both others (each lends at most half its pool);
 * released, it leaves the home room for what a drain moves. */
static const kvm_model drain_model = {.id = "drain", .layers = 1, .q_heads = 4, .kv_heads = 2,
				      .head_dim = 64, .block_tokens = 16, .dtype = KVM_F16};
static uint32_t drain_setup(ref_seq r[2], uint32_t *total)
{
	const kvm_model *m = &drain_model;
	uint32_t n = 42 * 16 + 3;
	uint32_t *p1 = tokens_of(n, 41), *p2 = tokens_of(48, 42), *p3 = tokens_of(16 * 16, 43);
	ref_seq filler;
	kvm_seq_info i1, i2, i3;
	make_seq(&filler, m, "filler", "agent-1", p3, 16 * 16, 53, &i3);
	make_seq(&r[0], m, "wide", "agent-1", p1, n, 51, &i1);
	make_seq(&r[1], m, "on3", "agent-3", p2, 48, 52, &i2);
	cr_assert_eq(kvm_seq_release(g_c, "filler"), 0);
	ref_free(&filler);
	free(p1), free(p2), free(p3);
	uint32_t before = blocks_on("wide", "agent-3", total);
	cr_assert_gt(before, 0, "no block of the sequence is on agent-3");
	const char *ids[] = {"wide", "on3"};
	decode_and_check(r, ids, 2, 1, 2e-3);
	return before;
}

/* Waits until the coordinator lists node as dead. */
static void wait_dead(const char *node)
{
	for (int i = 0; i < 100; i++) {
		if (node_now(node).state == KVMESH__V1__NODE_STATE__NODE_DEAD)
			return;
		usleep(100000);
	}
	cr_assert_fail("%s is not declared dead", node);
}

/* How many lines of a daemon's log (in the cluster's directory) hold `what`. */
static int log_lines(const char *daemon, const char *what)
{
	char path[PATH_MAX + 32], line[2048];
	snprintf(path, sizeof path, "%s/%s.log", local_cluster_dir(g_lc), daemon);
	FILE *f = fopen(path, "r");
	cr_assert(f, "no log %s", path);
	int n = 0;
	while (fgets(line, sizeof line, f))
		n += strstr(line, what) != NULL;
	fclose(f);
	return n;
}

Test(client, drain_moves_blocks_and_decode_goes_on)
{
	start(3, "256KiB", &drain_model, 5000); /* 32 blocks of 8 KiB */
	ref_seq r[2];
	uint32_t total = 0, before = drain_setup(r, &total);
	const char *ids[] = {"wide", "on3"};
	uint32_t on3_total, on3_before = blocks_on("on3", "agent-3", &on3_total);

	/* Watchers hear where the blocks and the home went. */
	kvm_rpc_channel *wch;
	cr_assert_eq(kvm_rpc_channel_open(local_cluster_coordinator(g_lc), &wch), 0);
	Kvmesh__V1__WatchEventsRequest wr = KVMESH__V1__WATCH_EVENTS_REQUEST__INIT;
	wr.after_seq = 1; /* from the start: the stream may begin after the drain */
	uint8_t wbuf[16];
	kvm_rpc_stream *ws;
	cr_assert_eq(kvm_rpc_stream_open(wch, "/kvmesh.v1.Coordinator/WatchEvents", wbuf,
					 kvmesh__v1__watch_events_request__pack(&wr, wbuf), 15000, &ws), 0);

	cr_assert_eq(demo_node_admin(local_cluster_coordinator(g_lc), NULL, "DrainNode", "agent-3"), 0);
	cr_assert_eq(node_now("agent-3").state, KVMESH__V1__NODE_STATE__NODE_DRAINING);
	demo_node nd = {.drain_left = 1, .drain_homes = 1};
	for (int i = 0; i < 150 && (nd.drain_left || nd.drain_homes); i++) {
		usleep(100000);
		nd = node_now("agent-3");
	}
	cr_assert_eq(nd.drain_homes, 0, "on3 is still homed on the draining node");
	cr_assert_eq(nd.drain_left, 0, "%" PRIu64 " blocks are still on the draining node",
		     nd.drain_left);
	uint32_t heard_wide = 0, heard_on3 = 0;
	bool drained_event = false, home_moved = false;
	void *msg;
	size_t mlen;
	while (!drained_event && kvm_rpc_stream_next(ws, &msg, &mlen) == 1) {
		Kvmesh__V1__Event *ev = kvmesh__v1__event__unpack(NULL, mlen, msg);
		free(msg);
		cr_assert(ev);
		if (ev->kind_case == KVMESH__V1__EVENT__KIND_SEQUENCE &&
		    ev->sequence->kind == KVMESH__V1__SEQUENCE_EVENT__KIND__MOVED) {
			cr_assert_str_neq(ev->sequence->node_id, "agent-3");
			if (strcmp(ev->sequence->sequence_id, "wide") == 0)
				heard_wide += (uint32_t)ev->sequence->n_moved_blocks;
			else
				heard_on3 += (uint32_t)ev->sequence->n_moved_blocks;
		}
		if (ev->kind_case == KVMESH__V1__EVENT__KIND_SEQUENCE &&
		    ev->sequence->kind == KVMESH__V1__SEQUENCE_EVENT__KIND__HOME_MOVED) {
			cr_assert_str_eq(ev->sequence->sequence_id, "on3");
			cr_assert_str_neq(ev->sequence->node_id, "agent-3");
			cr_assert_eq(heard_on3, 0, "on3's blocks moved before its home did");
			home_moved = true;
		}
		drained_event |= ev->kind_case == KVMESH__V1__EVENT__KIND_NODE &&
				 strstr(ev->node->reason, "drained") != NULL;
		kvmesh__v1__event__free_unpacked(ev, NULL);
	}
	kvm_rpc_stream_close(ws);
	kvm_rpc_channel_close(wch);
	cr_assert(drained_event, "no drained event");
	cr_assert(home_moved, "no HOME_MOVED event for on3");
	cr_assert_eq(heard_wide, before, "MOVED events named %u of the %u moved blocks", heard_wide,
		     before);
	cr_assert_eq(heard_on3, on3_before, "MOVED events named %u of on3's %u blocks", heard_on3,
		     on3_before);
	uint32_t after_total;
	cr_assert_eq(blocks_on("wide", "agent-3", &after_total), 0);
	cr_assert_eq(after_total, total);
	cr_assert_eq(blocks_on("on3", "agent-3", &after_total), 0);
	cr_assert_eq(after_total, on3_total);
	kvm_seq_info on3;
	cr_assert_eq(kvm_seq_get(g_c, "on3", &on3), 0);
	cr_assert_str_neq(on3.home, "agent-3");
	cr_assert_gt(log_lines("agent-3", "event=hand_off seq=on3"), 0);
	/* The old copies go once the new places are durable... */
	double pinned = -1;
	for (int i = 0; i < 50 && pinned != 0; i++) {
		pinned = agent_counter(2, "pinned_blocks");
		if (pinned != 0)
			usleep(100000);
	}
	cr_assert_eq(pinned, 0, "agent-3 still pins %.0f blocks", pinned);
	/* ...while the homes still name them: an ATTEND finds them gone, and
	 * the home fetches the sequence again; the client, sending on3's step
	 * to agent-3, is told the home moved and follows it. */
	decode_and_check(r, ids, 2, 3, 2e-3);
	cr_assert_gt(log_lines("agent-1", "event=home_sequence_moved"), 0);
	cr_assert_eq(log_lines("agent-1", "event=attend_peer_failed"), 0,
		     "a peer failure the home recovered from is no failure");

	/* Drained: killing it loses nothing. */
	cr_assert_eq(local_cluster_signal_agent(g_lc, 2, SIGKILL), 0);
	wait_dead("agent-3");
	kvm_seq_info now;
	cr_assert_eq(kvm_seq_get(g_c, "wide", &now), 0);
	cr_assert_eq(now.degraded, 0, "the drained node's death degraded a sequence");
	cr_assert_eq(kvm_seq_get(g_c, "on3", &now), 0);
	cr_assert_eq(now.degraded, 0, "the drained node's death degraded its old sequence");
	decode_and_check(r, ids, 2, 2, 2e-3);
	ref_free(&r[0]);
	ref_free(&r[1]);
}

/* The coordinator dies right after DrainNode, its moves in flight or not
 * yet sent: the drain is durable, so the restarted coordinator plans them
 * again from the agents' reports, and nothing is lost or doubled. */
Test(client, drain_survives_a_coordinator_restart)
{
	start(3, "256KiB", &drain_model, 5000);
	ref_seq r[2];
	uint32_t total = 0;
	drain_setup(r, &total);
	kvm_seq_info was;
	cr_assert_eq(kvm_seq_get(g_c, "wide", &was), 0);
	cr_assert_eq(demo_node_admin(local_cluster_coordinator(g_lc), NULL, "DrainNode", "agent-3"), 0);
	char err[2048];
	cr_assert_eq(local_cluster_restart_coordinator(g_lc, err, sizeof(err)), 0, "%s", err);
	demo_node nd = {0};
	for (int i = 0; i < 150; i++) {
		nd = node_now("agent-3");
		if (nd.state == KVMESH__V1__NODE_STATE__NODE_DRAINING && nd.drain_left == 0 &&
		    blocks_on("wide", "agent-3", &total) == 0)
			break;
		usleep(100000);
	}
	cr_assert_eq(nd.state, KVMESH__V1__NODE_STATE__NODE_DRAINING, "the drain did not survive the restart");
	cr_assert_eq(nd.drain_left, 0, "%" PRIu64 " blocks still to move after the restart", nd.drain_left);
	kvm_seq_info now;
	for (int i = 0; i < 50; i++) { /* handles come back with the full reports */
		cr_assert_eq(kvm_seq_get(g_c, "wide", &now), 0);
		if (now.written_blocks == was.written_blocks)
			break;
		usleep(100000);
	}
	cr_assert_eq(now.written_blocks, was.written_blocks);
	cr_assert_eq(now.degraded, 0);
	uint32_t after_total;
	cr_assert_eq(blocks_on("wide", "agent-3", &after_total), 0);
	cr_assert_eq(after_total, total);
	const char *ids[] = {"wide", "on3"};
	decode_and_check(r, ids, 2, 3, 2e-3);
	ref_free(&r[0]);
	ref_free(&r[1]);
}

/* SIGTERM drains first: the agent asks for its own drain, serves until the
 * blocks other nodes' sequences keep there have moved and its own sequences
 * are handed to other agents (no new ones come), then exits 0; every
 * sequence decodes on, not degraded, the handed-off one at its new home. */
Test(client, sigterm_drains_before_the_agent_exits)
{
	start_with(3, "256KiB", &drain_model, 5000, "--drain-timeout=20s", NULL);
	ref_seq r[2];
	uint32_t total = 0;
	drain_setup(r, &total);
	cr_assert_eq(local_cluster_signal_agent(g_lc, 2, SIGTERM), 0);
	kvm_seq_info info;
	int rc = -1;
	for (int i = 0; i < 50; i++) { /* once the drain began: no new home there */
		rc = kvm_seq_create(g_c, drain_model.id, "late", NULL, 0, "agent-3", &info);
		if (rc != 0)
			break;
		cr_assert_eq(kvm_seq_release(g_c, "late"), 0);
		usleep(50000);
	}
	cr_assert_neq(rc, 0, "a sequence was homed on a draining node");
	cr_assert(strstr(kvm_client_error(g_c), "draining"), "%s", kvm_client_error(g_c));
	int st = local_cluster_wait_agent(g_lc, 2, 25000);
	cr_assert_eq(st, 0, "agent-3 exit status %d", st);
	cr_assert_gt(log_lines("agent-3", "event=drain_before_exit result=\"drained\""), 0,
		     "agent-3 did not say it drained");
	cr_assert_gt(log_lines("agent-3", "event=hand_off seq=on3"), 0);
	uint32_t after_total;
	cr_assert_eq(blocks_on("wide", "agent-3", &after_total), 0);
	cr_assert_eq(blocks_on("on3", "agent-3", &after_total), 0);
	wait_dead("agent-3");
	const char *ids[] = {"wide", "on3"};
	for (int i = 0; i < 2; i++) {
		kvm_seq_info now;
		cr_assert_eq(kvm_seq_get(g_c, ids[i], &now), 0);
		cr_assert_eq(now.degraded, 0, "the drained node's exit degraded %s", ids[i]);
		cr_assert_str_neq(now.home, "agent-3");
	}
	decode_and_check(r, ids, 2, 3, 2e-3);
	ref_free(&r[0]);
	ref_free(&r[1]);
}

/* The coordinator dies and comes back from its store during decode: models
 * and sequences come back, the agents register again and report their
 * blocks, and decode goes on with the same results (new blocks are placed
 * again once the tail fills). */
Test(client, coordinator_restart_mid_decode)
{
	kvm_model m = {.id = "crash", .layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
		       .block_tokens = 16, .dtype = KVM_F16};
	start(3, "512KiB", &m, 5000);
	uint32_t n = 45 * 16 + 9;
	uint32_t *prompt = tokens_of(n, 21);
	ref_seq r;
	kvm_seq_info before, after;
	make_seq(&r, &m, "c1", "agent-1", prompt, n, 31, &before);
	const char *ids[] = {"c1"};
	decode_and_check(&r, ids, 1, 2, 2e-3);
	cr_assert_eq(kvm_seq_get(g_c, "c1", &before), 0);
	char err[2048];
	cr_assert_eq(local_cluster_restart_coordinator(g_lc, err, sizeof(err)), 0, "%s", err);
	/* Handles come back with the agents' reports (heartbeat 200 ms). */
	for (int i = 0; i < 200; i++) {
		cr_assert_eq(kvm_seq_get(g_c, "c1", &after), 0, "%s", kvm_client_error(g_c));
		if (after.written_blocks == before.written_blocks)
			break;
		usleep(100000);
	}
	cr_assert_eq(after.blocks, before.blocks);
	cr_assert_eq(after.written_blocks, before.written_blocks, "block handles did not come back");
	cr_assert_eq(after.degraded, 0);
	decode_and_check(&r, ids, 1, 12, 2e-3); /* crosses a block boundary */
	ref_free(&r);
	free(prompt);
}

/* An agent killed and started again comes back empty: it registers again,
 * the sequences that had blocks there are degraded, and decode on them says
 * so instead of answering. */
Test(client, restarted_agent_degrades_its_sequences)
{
	kvm_model m = {.id = "again", .layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64,
		       .block_tokens = 16, .dtype = KVM_F16};
	start(3, "256KiB", &m, 5000);
	uint32_t n = 50 * 16;
	uint32_t *prompt = tokens_of(n, 22);
	ref_seq r;
	kvm_seq_info info;
	make_seq(&r, &m, "d1", "agent-1", prompt, n, 32, &info);
	char err[2048];
	cr_assert_eq(local_cluster_restart_agent(g_lc, 2, err, sizeof(err)), 0, "%s", err);
	/* Its full report is empty: the blocks it held are gone. */
	for (int i = 0; i < 200 && !info.degraded; i++) {
		usleep(100000);
		cr_assert_eq(kvm_seq_get(g_c, "d1", &info), 0);
	}
	cr_assert(info.degraded, "the sequence is not degraded after its creditor lost its blocks");
	ref_append(&r);
	float q[256] = {0}, o[256], lse[4];
	kvm_attend a = {.seq_id = "d1", .q = q, .k_new = ref_row(&r, 0, r.tokens - 1, 0),
			.v_new = ref_row(&r, 0, r.tokens - 1, 1), .o = o, .lse = lse};
	cr_assert_neq(kvm_attend_append(g_c, 0, 0, &a, 1), 0, "decode over lost blocks answered");
	cr_assert(strstr(kvm_client_error(g_c), "degraded") || strstr(kvm_client_error(g_c), "agent-3"),
		  "%s", kvm_client_error(g_c));
	ref_free(&r);
	free(prompt);
}

/* A token file (mode) in a new directory; the path is written to path[cap]. */
static void token_file(char *path, size_t cap, const char *token, mode_t mode)
{
	char dir[] = "/tmp/kvmesh-token-XXXXXX";
	cr_assert_not_null(mkdtemp(dir));
	snprintf(path, cap, "%s/token", dir);
	FILE *f = fopen(path, "w");
	cr_assert_not_null(f);
	fprintf(f, "%s\n", token);
	fclose(f);
	cr_assert_eq(chmod(path, mode), 0);
}

static void token_file_remove(const char *path)
{
	unlink(path);
	char dir[256];
	snprintf(dir, sizeof dir, "%s", path);
	*strrchr(dir, '/') = '\0';
	rmdir(dir);
}

/* Every daemon with --auth-token-file: the agents register (their calls to
 * the coordinator carry the token), the client with the token decodes over
 * three agents (home to peers: data plane and Agent.PutBlocks with the
 * token) and matches the local kernel; clients without it, or with another
 * one, are refused on both planes with -EACCES and a message that says so. */
Test(client, shared_token_cluster)
{
	char path[256], flag[300], wrong[256];
	token_file(path, sizeof path, "cluster-secret-0123456789", 0600);
	token_file(wrong, sizeof wrong, "cluster-secret-0123456780", 0600);
	snprintf(flag, sizeof flag, "--auth-token-file=%s", path);
	kvm_model m = {.id = "auth16", .layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64,
		       .block_tokens = 16, .dtype = KVM_F16};
	start_with(3, "512KiB", &m, 5000, NULL, flag);
	uint32_t n = 52 * 16 - 5; /* more than one agent holds */
	uint32_t *prompt = tokens_of(n, 3);
	ref_seq r;
	kvm_seq_info info, now;
	make_seq(&r, &m, "t1", "agent-1", prompt, n, 11, &info);
	cr_assert_gt(nodes_holding("t1", &now), 0, "no block was borrowed");
	const char *ids[] = {"t1"};
	decode_and_check(&r, ids, 1, 8, 2e-3); /* crosses a block boundary: a seal */

	/* No token, then a wrong one: refused by the coordinator. */
	kvm_client *c;
	kvm_model got;
	kvm_client_opts none = {0}, bad = {.auth_token_file = wrong};
	const kvm_client_opts *refused[] = {&none, &bad};
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(kvm_client_open(local_cluster_coordinator(g_lc), refused[i], &c), 0);
		cr_assert_eq(kvm_model_get(c, m.id, &got), -EACCES);
		cr_assert(strstr(kvm_client_error(c), "missing or wrong authorization token"), "%s",
			  kvm_client_error(c));
		kvm_client_close(c);
	}
	/* The token given directly works as the file does. */
	kvm_client_opts direct = {.auth_token = "cluster-secret-0123456789"};
	cr_assert_eq(kvm_client_open(local_cluster_coordinator(g_lc), &direct, &c), 0);
	cr_assert_eq(kvm_model_get(c, m.id, &got), 0, "%s", kvm_client_error(c));
	cr_assert_eq(got.layers, 2);
	kvm_client_close(c);

	/* The home agent's data server: HELLO without the token, or with
	 * another, is refused; with it, served. */
	char host[64];
	snprintf(host, sizeof host, "%s", local_cluster_agent_data(g_lc, 0));
	char *colon = strrchr(host, ':');
	*colon = '\0';
	uint16_t port = (uint16_t)atoi(colon + 1);
	xport_loop *l;
	cr_assert_eq(xport_loop_create(&l), 0);
	xport_opts o;
	xport_opts_default(&o);
	o.n_conns = 1;
	xport_peer *p = NULL;
	cr_assert_eq(xport_tcp_connect(l, host, port, &o, &p), -EACCES);
	o.auth_token = "cluster-secret-0123456780";
	cr_assert_eq(xport_tcp_connect(l, host, port, &o, &p), -EACCES);
	o.auth_token = "cluster-secret-0123456789";
	cr_assert_eq(xport_tcp_connect(l, host, port, &o, &p), 0);
	xport_close(p);
	xport_loop_destroy(l);

	/* A token file others may read is refused at open. */
	cr_assert_eq(chmod(wrong, 0644), 0);
	cr_assert_eq(kvm_client_open(local_cluster_coordinator(g_lc), &bad, &c), -EPERM);
	ref_free(&r);
	free(prompt);
	token_file_remove(path);
	token_file_remove(wrong);
}
