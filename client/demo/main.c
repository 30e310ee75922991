/* kvmesh-demo: the main job (`make run`).
 *
 * Starts a local cluster (a coordinator and three agents on loopback), or
 * uses an existing one (--coordinator), registers a small synthetic
 * transformer, runs prefill and then decode for several sequences whose
 * contexts are longer than one agent's pool, so that their blocks are
 * borrowed from the other agents, and checks that every generated token and
 * the final logits equal a single-process run of the same model with local
 * attention. Prefill runs here, as a front-end's prefill node would run it;
 * its KV is written back to the cluster, and decode runs attention where the
 * KV lives. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client/demo/launch.h"
#include "client/demo/model.h"
#include "client/demo/nodes.h"
#include "client/kvmesh.h"
#include "common/auth.h"
#include "common/config.h"
#include "kernels/distattn.h"

typedef struct demo_opts {
	char coordinator[KVM_OPT_STRING_MAX];
	char dtype[KVM_OPT_STRING_MAX];
	char pool[KVM_OPT_STRING_MAX];
	char token_file[KVM_OPT_STRING_MAX];
	int64_t agents, sequences, prompt, shared, steps, layers, width, q_heads, kv_heads, block_tokens;
	int64_t seed;
	bool keep, quiet;
} demo_opts;

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static bool progress_tty, progress_quiet;

/* One progress line, rewritten in place on a terminal (a log gets fewer:
 * the caller says which lines matter with `milestone`). */
__attribute__((format(printf, 2, 3))) static void progress_at(bool milestone, const char *fmt, ...)
{
	if (progress_quiet || (!progress_tty && !milestone))
		return;
	char line[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (progress_tty)
		fprintf(stderr, "\r\033[K%s", line);
	else
		fprintf(stderr, "%s\n", line);
}

#define progress(...) progress_at(true, __VA_ARGS__)

static void progress_done(void)
{
	if (progress_tty && !progress_quiet)
		fputc('\n', stderr);
}

/* ---- the reference: a sequence's KV in local paged blocks --------------------- */

typedef struct local_kv {
	uint8_t **blocks;
	uint32_t n_blocks, cap;
	size_t block_bytes;
} local_kv;

static void *local_block(local_kv *kv, uint32_t b)
{
	while (b >= kv->n_blocks) {
		if (kv->n_blocks == kv->cap) {
			kv->cap = kv->cap ? kv->cap * 2 : 64;
			kv->blocks = realloc(kv->blocks, kv->cap * sizeof(*kv->blocks));
			if (!kv->blocks)
				abort();
		}
		if (!(kv->blocks[kv->n_blocks++] = calloc(1, kv->block_bytes)))
			abort();
	}
	return kv->blocks[b];
}

static void local_write(local_kv *kv, const demo_model *m, uint32_t bt, uint32_t layer, uint32_t pos,
			const void *k, const void *v)
{
	size_t row = demo_row_bytes(m);
	uint8_t *blk = local_block(kv, pos / bt);
	uint8_t *kp = blk + ((size_t)layer * 2 * bt + pos % bt) * row;
	memcpy(kp, k, row);
	memcpy(kp + (size_t)bt * row, v, row);
}

static void local_free(local_kv *kv)
{
	for (uint32_t i = 0; i < kv->n_blocks; i++)
		free(kv->blocks[i]);
	free(kv->blocks);
}

static da_shape shape_of(const demo_model *m, uint32_t bt, uint32_t layer)
{
	return (da_shape){.q_heads = m->q_heads,
			  .kv_heads = m->kv_heads,
			  .head_dim = m->head_dim,
			  .block_tokens = bt,
			  .layer = layer,
			  .kv_dtype = m->dtype == KVM_F32 ? DA_F32 : m->dtype == KVM_F16 ? DA_F16 : DA_BF16,
			  .scale = 1.0f / sqrtf((float)m->head_dim)};
}

/* Prefill of one prompt with local causal attention: fills kv and returns
 * the last position's hidden state in x_last. */
static int prefill(da_ctx *ctx, const demo_model *m, uint32_t bt, const uint32_t *prompt, uint32_t P,
		   local_kv *kv, float *x_last)
{
	uint32_t W = m->width, QD = m->q_heads * m->head_dim;
	float *X = malloc((size_t)P * W * sizeof(float));
	float *Q = malloc((size_t)P * QD * sizeof(float));
	float *O = malloc((size_t)P * QD * sizeof(float));
	float *L = malloc((size_t)P * m->q_heads * sizeof(float));
	uint32_t *start = malloc((P + 1) * sizeof(uint32_t)), *ntok = malloc(P * sizeof(uint32_t));
	size_t total = 0;
	for (uint32_t t = 0; t < P; t++)
		total += t / bt + 1;
	const void **lists = malloc(total * sizeof(void *));
	uint8_t krow[4096], vrow[4096];
	int rc = 0;
	if (!X || !Q || !O || !L || !start || !ntok || !lists || demo_row_bytes(m) > sizeof(krow)) {
		rc = -ENOMEM;
		goto out;
	}
	for (uint32_t t = 0; t < P; t++)
		demo_embed(m, prompt[t], X + (size_t)t * W);
	local_block(kv, (P - 1) / bt);
	for (uint32_t l = 0; l < m->layers && rc == 0; l++) {
		for (uint32_t t = 0; t < P; t++) {
			demo_qkv(m, l, X + (size_t)t * W, t, Q + (size_t)t * QD, krow, vrow);
			local_write(kv, m, bt, l, t, krow, vrow);
		}
		/* Position t attends to positions 0..t: its list is blocks 0..t/bt. */
		size_t at = 0;
		for (uint32_t t = 0; t < P; t++) {
			start[t] = (uint32_t)at;
			for (uint32_t b = 0; b <= t / bt; b++)
				lists[at++] = kv->blocks[b];
			ntok[t] = t + 1;
		}
		start[P] = (uint32_t)at;
		da_shape s = shape_of(m, bt, l);
		da_batch b = {.n_queries = P, .q = Q, .blocks = lists, .block_start = start, .n_tokens = ntok,
			      .max_blocks = (P - 1) / bt + 1};
		rc = da_partial_cpu(ctx, &s, &b, O, L);
		for (uint32_t t = 0; t < P && rc == 0; t++)
			demo_finish_layer(m, l, X + (size_t)t * W, O + (size_t)t * QD);
	}
	memcpy(x_last, X + (size_t)(P - 1) * W, W * sizeof(float));
out:
	free(X), free(Q), free(O), free(L), free(start), free(ntok), free(lists);
	return rc;
}

/* One decode step of one sequence on local KV: appends its K/V at pos. */
static int local_step(da_ctx *ctx, const demo_model *m, uint32_t bt, local_kv *kv, uint32_t token,
		      uint32_t pos, float *logits)
{
	uint32_t QD = m->q_heads * m->head_dim;
	float x[m->width], q[QD], o[QD], lse[m->q_heads];
	uint8_t krow[4096], vrow[4096];
	demo_embed(m, token, x);
	for (uint32_t l = 0; l < m->layers; l++) {
		demo_qkv(m, l, x, pos, q, krow, vrow);
		local_write(kv, m, bt, l, pos, krow, vrow);
		uint32_t nb = pos / bt + 1, start[2] = {0, nb}, ntok = pos + 1;
		da_shape s = shape_of(m, bt, l);
		da_batch b = {.n_queries = 1, .q = q, .blocks = (const void *const *)kv->blocks, .block_start = start,
			      .n_tokens = &ntok, .max_blocks = nb};
		int rc = da_partial_cpu(ctx, &s, &b, o, lse);
		if (rc)
			return rc;
		demo_finish_layer(m, l, x, o);
	}
	demo_logits(m, x, logits);
	return 0;
}

static int node_cmp(const void *a, const void *b)
{
	return strcmp(((const demo_node *)a)->id, ((const demo_node *)b)->id);
}

static void human_bytes(double b, char *out, size_t cap)
{
	const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
	int i = 0;
	while (b >= 1024 && i < 4)
		b /= 1024, i++;
	snprintf(out, cap, i ? "%.1f %s" : "%.0f %s", b, u[i]);
}

/* ---- main ----------------------------------------------------------------------------- */

#define MAX_SEQS 16

int main(int argc, char **argv)
{
	static demo_opts o;
	const kvm_option opts[] = {
		{"coordinator", KVM_OPT_STRING, o.coordinator, "",
		 "use the cluster of this coordinator (host:port) instead of starting one"},
		{"auth-token-file", KVM_OPT_STRING, o.token_file, "",
		 "the cluster's token file (mode 0600); a local cluster is started with it"},
		{"agents", KVM_OPT_INT, &o.agents, "3", "agents of the local cluster"},
		{"pool", KVM_OPT_STRING, o.pool, "1536KiB", "host pool of each local agent"},
		{"sequences", KVM_OPT_INT, &o.sequences, "3", "sequences decoded together"},
		{"prompt", KVM_OPT_INT, &o.prompt, "1560", "prompt tokens of each sequence"},
		{"shared", KVM_OPT_INT, &o.shared, "512", "leading prompt tokens every sequence shares"},
		{"steps", KVM_OPT_INT, &o.steps, "32", "tokens generated for each sequence"},
		{"layers", KVM_OPT_INT, &o.layers, "4", "layers of the synthetic model"},
		{"width", KVM_OPT_INT, &o.width, "256", "model width"},
		{"q-heads", KVM_OPT_INT, &o.q_heads, "8", "query heads"},
		{"kv-heads", KVM_OPT_INT, &o.kv_heads, "2", "KV heads (GQA when fewer than query heads)"},
		{"block-tokens", KVM_OPT_INT, &o.block_tokens, "16", "tokens per KV block"},
		{"dtype", KVM_OPT_STRING, o.dtype, "f16", "KV cache type: f32, f16 or bf16"},
		{"seed", KVM_OPT_INT, &o.seed, "1", "seed of the weights and prompts"},
		{"keep", KVM_OPT_BOOL, &o.keep, "false", "keep the local cluster's directory (logs)"},
		{"quiet", KVM_OPT_BOOL, &o.quiet, "false", "no progress lines"},
	};
	const size_t n_opts = sizeof(opts) / sizeof(opts[0]);
	char err[2048];
	int rc = kvm_config_load(opts, n_opts, &argc, argv, err, sizeof(err));
	if (rc == KVM_CONFIG_HELP) {
		kvm_config_usage(stdout, "kvmesh-demo",
				 "Runs a synthetic transformer's decode with its KV spread over a kvmesh cluster,\n"
				 "and checks it against the same model with local attention.",
				 opts, n_opts);
		return 0;
	}
	kvm_dtype dtype = !strcmp(o.dtype, "f32") ? KVM_F32 : !strcmp(o.dtype, "f16") ? KVM_F16
							 : !strcmp(o.dtype, "bf16") ? KVM_BF16 : 0;
	if (rc == 0 && (argc > 1 || !dtype || o.sequences < 1 || o.sequences > MAX_SEQS || o.prompt < 1 ||
			o.shared < 0 || o.shared > o.prompt || o.steps < 1 || o.agents < 1 ||
			o.agents > LC_MAX_AGENTS || o.block_tokens < 1 || o.layers < 1)) {
		snprintf(err, sizeof(err), "%s",
			 argc > 1 ? "unexpected argument (see --help)"
			 : !dtype ? "--dtype must be f32, f16 or bf16"
				  : "a count is out of range (see --help)");
		rc = -EINVAL;
	}
	static char c_token[KVM_AUTH_TOKEN_MAX + 1];
	if (rc == 0 && o.token_file[0])
		rc = kvm_auth_load_token(o.token_file, c_token, sizeof(c_token), err, sizeof(err));
	if (rc != 0) {
		fprintf(stderr, "kvmesh-demo: %s\n", err);
		return 2;
	}
	progress_tty = isatty(2);
	progress_quiet = o.quiet;
	setvbuf(stdout, NULL, _IOLBF, 0); /* summary lines interleave with progress on stderr */

	uint32_t bt = (uint32_t)o.block_tokens, P = (uint32_t)o.prompt, G = (uint32_t)o.steps;
	uint32_t NS = (uint32_t)o.sequences;

	demo_model m;
	if ((rc = demo_model_init(&m, 512, (uint32_t)o.width, (uint32_t)o.layers, (uint32_t)o.q_heads,
				  (uint32_t)o.kv_heads, 2 * (uint32_t)o.width, dtype, (uint64_t)o.seed)) != 0) {
		fprintf(stderr, "kvmesh-demo: the model's shape does not work (width a multiple of 2*q-heads, "
				"q-heads a multiple of kv-heads): %s\n",
			kvm_strerror(rc));
		return 2;
	}
	kvm_model km = {.layers = m.layers, .q_heads = m.q_heads, .kv_heads = m.kv_heads,
			.head_dim = m.head_dim, .block_tokens = bt, .dtype = dtype};
	snprintf(km.id, sizeof(km.id), "demo-L%u-W%u-H%u-KV%u-%.8s", m.layers, m.width, m.q_heads, m.kv_heads,
		 o.dtype);
	size_t block_bytes = kvm_block_bytes(&km);

	printf("kvmesh demo: a %u-layer transformer (width %u, %u query heads, %u KV heads, %s KV, "
	       "%u-token blocks of %zu KiB)\n",
	       m.layers, m.width, m.q_heads, m.kv_heads, o.dtype, bt, block_bytes / 1024);

	local_cluster *lc = NULL;
	const char *coord = o.coordinator;
	char token_flag[KVM_OPT_STRING_MAX + 32];
	snprintf(token_flag, sizeof(token_flag), "--auth-token-file=%s", o.token_file);
	const char *const daemon_flags[] = {o.token_file[0] ? token_flag : NULL, NULL};
	if (!coord[0]) {
		if ((rc = local_cluster_start(daemon_flags, &lc, err, sizeof(err))) != 0) {
			fprintf(stderr, "kvmesh-demo: %s\n", err);
			return 1;
		}
		coord = local_cluster_coordinator(lc);
	}
	kvm_client *c = NULL;
	kvm_client_opts co = {.auth_token = c_token};
	if ((rc = kvm_client_open(coord, &co, &c)) != 0 || (rc = kvm_model_register(c, &km)) != 0) {
		fprintf(stderr, "kvmesh-demo: cannot register the model with %s: %s\n", coord,
			rc && c ? kvm_client_error(c) : kvm_strerror(rc));
		local_cluster_stop(lc, o.keep);
		return 1;
	}
	if (lc) {
		double t0 = now_s();
		if ((rc = local_cluster_add_agents(lc, (unsigned)o.agents, km.id, o.pool, daemon_flags, err,
						   sizeof(err))) !=
		    0) {
			fprintf(stderr, "kvmesh-demo: %s\n(logs in %s)\n", err, local_cluster_dir(lc));
			kvm_client_close(c);
			local_cluster_stop(lc, 1);
			return 1;
		}
		printf("local cluster: coordinator %s, %u agents with %s of KV each, up in %.1f s (logs: %s)\n", coord,
		       local_cluster_agents(lc), o.pool, now_s() - t0, local_cluster_dir(lc));
	}

	/* The library's connection lines are noise here; warnings still show.
	 * Set after the daemons started, so that their logs keep info lines. */
	if (!getenv("KVMESH_LOG_LEVEL"))
		setenv("KVMESH_LOG_LEVEL", "warn", 1);

	/* Prompts: a shared system prefix, then each sequence's own tokens. */
	uint32_t *prompts = malloc((size_t)NS * P * sizeof(uint32_t));
	uint64_t rs = (uint64_t)o.seed * 7919 + 1;
	for (uint32_t s = 0; s < NS; s++)
		for (uint32_t t = 0; t < P; t++) {
			rs = rs * 6364136223846793005ull + 1442695040888963407ull;
			prompts[(size_t)s * P + t] = t < o.shared ? prompts[t] : (uint32_t)(rs >> 33) % m.vocab;
			if (s == 0 && t < o.shared)
				prompts[t] = (uint32_t)(rs >> 33) % m.vocab;
		}

	da_ctx *ctx;
	if ((rc = da_ctx_create(0, &ctx)) != 0) {
		fprintf(stderr, "kvmesh-demo: %s\n", kvm_strerror(rc));
		return 1;
	}
	local_kv kv[MAX_SEQS] = {0};
	float *logits = malloc((size_t)NS * m.vocab * sizeof(float));
	float *ref_logits = malloc((size_t)NS * m.vocab * sizeof(float));
	uint32_t *tokens = calloc((size_t)NS * (G + 1), sizeof(uint32_t));
	uint32_t *ref_tokens = calloc((size_t)NS * (G + 1), sizeof(uint32_t));
	char ids[MAX_SEQS][64];
	int status = 1;

	/* 1. Prefill here, then write the KV back to the cluster. */
	double t_prefill = now_s();
	uint32_t written = 0, shared_blocks = 0;
	for (uint32_t s = 0; s < NS; s++) {
		kv[s].block_bytes = block_bytes;
		float x[m.width];
		progress("prefill: sequence %u/%u, %u tokens", s + 1, NS, P);
		if ((rc = prefill(ctx, &m, bt, prompts + (size_t)s * P, P, &kv[s], x)) != 0) {
			fprintf(stderr, "\nkvmesh-demo: prefill: %s\n", kvm_strerror(rc));
			goto out;
		}
		demo_logits(&m, x, logits + (size_t)s * m.vocab);
		tokens[(size_t)s * (G + 1)] = demo_argmax(logits + (size_t)s * m.vocab, m.vocab);
		snprintf(ids[s], sizeof(ids[s]), "demo-%d-%u-%ld", (int)getpid(), s, (long)time(NULL));
		const char *home = lc ? local_cluster_agent_id(lc, s % local_cluster_agents(lc)) : NULL;
		kvm_seq_info info;
		if ((rc = kvm_seq_create(c, km.id, ids[s], prompts + (size_t)s * P, P, home, &info)) != 0) {
			fprintf(stderr, "\nkvmesh-demo: create sequence: %s\n", kvm_client_error(c));
			goto out;
		}
		shared_blocks += info.shared_prefix_blocks;
		uint32_t full = P / bt, n_written = 0, rest = P % bt;
		progress("prefill: sequence %u/%u, writing %u blocks back (%u shared)", s + 1, NS, full,
			 info.shared_prefix_blocks);
		if ((rc = kvm_seq_write_blocks(c, ids[s], prompts + (size_t)s * P, full,
					       (const void *const *)kv[s].blocks, &n_written)) != 0) {
			fprintf(stderr, "\nkvmesh-demo: write blocks: %s\n", kvm_client_error(c));
			goto out;
		}
		written += n_written;
		size_t row = demo_row_bytes(&m);
		for (uint32_t l = 0; rest && l < m.layers; l++) {
			const uint8_t *kp = kv[s].blocks[full] + (size_t)l * 2 * bt * row;
			if ((rc = kvm_append_kv(c, ids[s], l, rest, kp, kp + (size_t)bt * row)) != 0) {
				fprintf(stderr, "\nkvmesh-demo: append: %s\n", kvm_client_error(c));
				goto out;
			}
		}
	}
	t_prefill = now_s() - t_prefill;
	progress("prefill: %u sequences of %u tokens in %.1f s; %u blocks written, %u shared", NS, P, t_prefill,
		 written, shared_blocks);
	progress_done();

	/* 2. Decode through the cluster, all sequences in one batch per layer. */
	uint32_t QD = m.q_heads * m.head_dim;
	size_t row = demo_row_bytes(&m);
	float *x = malloc((size_t)NS * m.width * sizeof(float)), *q = malloc((size_t)NS * QD * sizeof(float));
	float *att_o = malloc((size_t)NS * QD * sizeof(float)), *att_lse = malloc((size_t)NS * m.q_heads * 4);
	uint8_t *krows = malloc(NS * row), *vrows = malloc(NS * row);
	kvm_attend req[MAX_SEQS];
	double t_decode = now_s();
	for (uint32_t g = 0; g < G; g++) {
		uint32_t pos = P + g;
		for (uint32_t s = 0; s < NS; s++)
			demo_embed(&m, tokens[(size_t)s * (G + 1) + g], x + (size_t)s * m.width);
		for (uint32_t l = 0; l < m.layers; l++) {
			for (uint32_t s = 0; s < NS; s++) {
				demo_qkv(&m, l, x + (size_t)s * m.width, pos, q + (size_t)s * QD, krows + s * row,
					 vrows + s * row);
				req[s] = (kvm_attend){.seq_id = ids[s], .q = q + (size_t)s * QD, .k_new = krows + s * row,
						      .v_new = vrows + s * row, .o = att_o + (size_t)s * QD,
						      .lse = att_lse + (size_t)s * m.q_heads};
			}
			if ((rc = kvm_attend_append(c, l, 0, req, NS)) != 0) {
				fprintf(stderr, "\nkvmesh-demo: decode step %u, layer %u: %s\n", g + 1, l,
					kvm_client_error(c));
				goto out;
			}
			for (uint32_t s = 0; s < NS; s++)
				demo_finish_layer(&m, l, x + (size_t)s * m.width, att_o + (size_t)s * QD);
		}
		for (uint32_t s = 0; s < NS; s++) {
			demo_logits(&m, x + (size_t)s * m.width, logits + (size_t)s * m.vocab);
			tokens[(size_t)s * (G + 1) + g + 1] = demo_argmax(logits + (size_t)s * m.vocab, m.vocab);
		}
		double el = now_s() - t_decode;
		progress_at((g + 1) % 8 == 0 || g + 1 == G, "decode: step %u/%u, %.1f tokens/s", g + 1, G,
			    (g + 1) * NS / el);
	}
	t_decode = now_s() - t_decode;
	progress_done();

	/* 3. The same decode in this process with local attention. */
	double t_ref = now_s();
	for (uint32_t s = 0; s < NS; s++) {
		ref_tokens[(size_t)s * (G + 1)] = tokens[(size_t)s * (G + 1)];
		for (uint32_t g = 0; g < G; g++) {
			if ((rc = local_step(ctx, &m, bt, &kv[s], ref_tokens[(size_t)s * (G + 1) + g], P + g,
					     ref_logits + (size_t)s * m.vocab)) != 0)
				goto out;
			ref_tokens[(size_t)s * (G + 1) + g + 1] =
				demo_argmax(ref_logits + (size_t)s * m.vocab, m.vocab);
		}
		progress("reference: sequence %u/%u decoded locally", s + 1, NS);
	}
	t_ref = now_s() - t_ref;
	progress_done();

	/* 4. Check, and say what it cost. */
	bool same_tokens = memcmp(tokens, ref_tokens, (size_t)NS * (G + 1) * sizeof(uint32_t)) == 0;
	double max_rel = 0;
	for (uint32_t s = 0; s < NS; s++) {
		double scale = 0, diff = 0;
		for (uint32_t i = 0; i < m.vocab; i++) {
			double a = logits[(size_t)s * m.vocab + i], b = ref_logits[(size_t)s * m.vocab + i];
			scale = fmax(scale, fabs(b));
			diff = fmax(diff, fabs(a - b));
		}
		max_rel = fmax(max_rel, diff / (scale > 0 ? scale : 1));
	}
	for (uint32_t s = 0; s < NS; s++) {
		kvm_seq_info info;
		if (kvm_seq_get(c, ids[s], &info) == 0)
			printf("sequence %s: home %s, %u blocks (%u borrowed from other agents, %u shared), first tokens "
			       "%u %u %u %u ...\n",
			       ids[s], info.home, info.blocks, info.borrowed_blocks, info.shared_prefix_blocks,
			       tokens[(size_t)s * (G + 1)], tokens[(size_t)s * (G + 1) + 1],
			       tokens[(size_t)s * (G + 1) + 2], tokens[(size_t)s * (G + 1) + 3]);
	}
	/* Blocks per node from the sequences' block maps (the coordinator's
	 * placements, exact now; the nodes' heartbeats lag by a second): a
	 * node's own blocks are those of sequences homed there, the rest it
	 * lends. A shared block counts once, for the first sequence listing it. */
	demo_node nodes[LC_MAX_AGENTS + 8];
	int nn = demo_list_nodes(coord, c_token, true, nodes, LC_MAX_AGENTS + 8);
	if (nn > LC_MAX_AGENTS + 8)
		nn = LC_MAX_AGENTS + 8;
	if (nn > 1)
		qsort(nodes, (size_t)nn, sizeof(nodes[0]), node_cmp);
	double net = 0;
	for (int i = 0; i < nn; i++) {
		uint64_t own = 0, lent = 0;
		char seen[MAX_SEQS * 256][16];
		uint32_t n_seen = 0;
		for (uint32_t s = 0; s < NS; s++) {
			kvm_block_info bi[256];
			uint32_t total = 0;
			if (kvm_seq_blocks(c, ids[s], bi, 256, &total) != 0)
				continue;
			for (uint32_t b = 0; b < total && b < 256; b++) {
				if (strcmp(bi[b].node, nodes[i].id) != 0)
					continue;
				char key[16];
				snprintf(key, sizeof(key), "%x/%x", bi[b].slot, bi[b].generation);
				bool dup = false;
				for (uint32_t k = 0; bi[b].written && k < n_seen && !dup; k++)
					dup = strcmp(seen[k], key) == 0;
				if (dup)
					continue;
				if (bi[b].written && n_seen < MAX_SEQS * 256)
					snprintf(seen[n_seen++], 16, "%s", key);
				if (bi[b].borrowed)
					lent++;
				else
					own++;
			}
		}
		printf("node %-10s %4" PRIu64 " blocks: %4" PRIu64 " for sequences homed here, %4" PRIu64
		       " lent to sequences homed elsewhere (pool %" PRIu64 ")\n",
		       nodes[i].id, own + lent, own, lent, nodes[i].total);
		net += nodes[i].data_bytes > 0 ? nodes[i].data_bytes : 0;
	}
	kvm_client_stats cs;
	kvm_client_get_stats(c, &cs);
	/* Moving the KV instead: every step of every layer would fetch the
	 * layer's K and V of each block that is not on the sequence's home. */
	double layer_block = 2.0 * bt * row, moved = 0;
	for (uint32_t s = 0; s < NS; s++) {
		kvm_seq_info info;
		if (kvm_seq_get(c, ids[s], &info) == 0)
			moved += (double)info.borrowed_blocks * layer_block * m.layers * G;
	}
	if (net == 0) /* agents without data-plane counters: the client's own traffic */
		net = (double)(cs.data_bytes_in + cs.data_bytes_out);
	char b_net[32], b_moved[32], b_written[32];
	human_bytes(net, b_net, sizeof(b_net));
	human_bytes(moved, b_moved, sizeof(b_moved));
	human_bytes((double)cs.blocks_written_bytes, b_written, sizeof(b_written));
	printf("decode: %u tokens in %.2f s = %.1f tokens/s through the cluster (local attention in this "
	       "process: %.1f tokens/s)\n",
	       NS * G, t_decode, NS * G / t_decode, NS * G / t_ref);
	printf("network: %s on the data plane during the run; moving the borrowed KV to each home instead "
	       "would have cost %s (prompt write-back: %s)\n",
	       b_net, b_moved, b_written);
	printf("check: generated tokens %s the local run; final logits differ by at most %.2e (relative, bar "
	       "1e-3)\n",
	       same_tokens ? "equal" : "DIFFER FROM", max_rel);
	status = same_tokens && max_rel <= 1e-3 ? 0 : 1;
	printf("%s\n", status == 0 ? "PASS" : "FAIL");
	for (uint32_t s = 0; s < NS; s++)
		kvm_seq_release(c, ids[s]);
	free(x), free(q), free(att_o), free(att_lse), free(krows), free(vrows);
out:
	for (uint32_t s = 0; s < NS; s++)
		local_free(&kv[s]);
	free(logits), free(ref_logits), free(tokens), free(ref_tokens), free(prompts);
	da_ctx_destroy(ctx);
	kvm_client_close(c);
	local_cluster_stop(lc, o.keep || status != 0);
	demo_model_free(&m);
	return status;
}
