/* DistAttention CPU kernels against a naive double-precision softmax
 * attention written here, over random shapes, dtypes, GQA groups and block
 * lists; the merge's algebra; splitting across "nodes"; bad arguments. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/distattn.h"

/* ---- Test data ------------------------------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
	/* splitmix64 */
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}
static uint32_t rng_below(uint64_t *s, uint32_t n)
{
	return (uint32_t)(rng_next(s) % n);
}
/* A value exactly representable in the dtype, so the reference sees exactly
 * what the kernel reads: k/1024 for fp16 (11 significant bits), k/128 for
 * bf16 (8 bits). */
static float rng_value(uint64_t *s, da_dtype t)
{
	int k = t == DA_BF16 ? (int)rng_below(s, 257) - 128 : (int)rng_below(s, 2049) - 1024;
	return t == DA_BF16 ? k / 128.0f : k / 1024.0f;
}

static void store_elem(void *base, size_t i, da_dtype t, float v)
{
	if (t == DA_F32) {
		((float *)base)[i] = v;
	} else if (t == DA_F16) {
		_Float16 h = (_Float16)v;
		memcpy((uint16_t *)base + i, &h, 2);
	} else {
		uint32_t u;
		memcpy(&u, &v, 4);
		((uint16_t *)base)[i] = (uint16_t)(u >> 16); /* exact for our values */
	}
}

/* A test problem: n queries, each with its own blocks (owned here). */
typedef struct problem {
	da_shape s;
	uint32_t layers;
	uint32_t nq;
	float *q;
	float **vals; /* per block: the K and V values of the block, as floats */
	void **blocks;
	uint32_t *start, *ntok;
	uint32_t total_blocks, max_blocks;
} problem;

static problem make_problem(uint64_t *rng, da_shape s, uint32_t layers, uint32_t nq,
			    const uint32_t *tokens, float q_mag)
{
	problem p = {.s = s, .layers = layers, .nq = nq};
	p.start = calloc(nq + 1, sizeof(uint32_t));
	p.ntok = calloc(nq, sizeof(uint32_t));
	for (uint32_t i = 0; i < nq; i++) {
		p.ntok[i] = tokens[i];
		uint32_t nb = (tokens[i] + s.block_tokens - 1) / s.block_tokens;
		p.start[i + 1] = p.start[i] + nb;
		if (nb > p.max_blocks)
			p.max_blocks = nb;
	}
	p.total_blocks = p.start[nq];
	size_t hd = (size_t)s.q_heads * s.head_dim;
	p.q = malloc(nq * hd * sizeof(float));
	for (size_t i = 0; i < nq * hd; i++)
		p.q[i] = q_mag * ((int)rng_below(rng, 2001) - 1000) / 1000.0f;
	size_t elems = da_block_bytes(&s, layers) / da_dtype_size(s.kv_dtype);
	p.blocks = calloc(p.total_blocks + 1, sizeof(void *));
	p.vals = calloc(p.total_blocks + 1, sizeof(float *));
	for (uint32_t b = 0; b < p.total_blocks; b++) {
		p.blocks[b] = malloc(elems * da_dtype_size(s.kv_dtype));
		p.vals[b] = malloc(elems * sizeof(float));
		for (size_t i = 0; i < elems; i++) {
			float v = rng_value(rng, s.kv_dtype);
			p.vals[b][i] = v;
			store_elem(p.blocks[b], i, s.kv_dtype, v);
		}
	}
	return p;
}

static void free_problem(problem *p)
{
	for (uint32_t b = 0; b < p->total_blocks; b++) {
		free(p->blocks[b]);
		free(p->vals[b]);
	}
	free(p->blocks);
	free(p->vals);
	free(p->q);
	free(p->start);
	free(p->ntok);
}

static da_batch batch_of(const problem *p)
{
	return (da_batch){.n_queries = p->nq,
			  .q = p->q,
			  .blocks = (const void *const *)p->blocks,
			  .block_start = p->start,
			  .n_tokens = p->ntok,
			  .max_blocks = p->max_blocks};
}

/* The naive reference, in double: softmax over every token of the query's
 * blocks, per query head. */
static void reference(const problem *p, uint32_t qi, double *o, double *lse)
{
	const da_shape *s = &p->s;
	uint32_t D = s->head_dim, G = s->q_heads / s->kv_heads, bt = s->block_tokens;
	size_t half = (size_t)bt * s->kv_heads * D;
	uint32_t n = p->ntok[qi];
	double *sc = malloc((n + 1) * sizeof(double));
	for (uint32_t h = 0; h < s->q_heads; h++) {
		const float *qh = p->q + ((size_t)qi * s->q_heads + h) * D;
		uint32_t kvh = h / G;
		double m = -INFINITY;
		for (uint32_t t = 0; t < n; t++) {
			const float *K = p->vals[p->start[qi] + t / bt] + 2 * half * s->layer;
			const float *k = K + ((size_t)(t % bt) * s->kv_heads + kvh) * D;
			double acc = 0;
			for (uint32_t i = 0; i < D; i++)
				acc += (double)qh[i] * k[i];
			sc[t] = acc * s->scale;
			if (sc[t] > m)
				m = sc[t];
		}
		double sum = 0;
		for (uint32_t i = 0; i < D; i++)
			o[(size_t)h * D + i] = 0;
		for (uint32_t t = 0; t < n; t++) {
			double w = exp(sc[t] - m);
			sum += w;
			const float *V = p->vals[p->start[qi] + t / bt] + 2 * half * s->layer + half;
			const float *v = V + ((size_t)(t % bt) * s->kv_heads + kvh) * D;
			for (uint32_t i = 0; i < D; i++)
				o[(size_t)h * D + i] += w * v[i];
		}
		for (uint32_t i = 0; i < D && n > 0; i++)
			o[(size_t)h * D + i] /= sum;
		lse[h] = n > 0 ? m + log(sum) : -INFINITY;
	}
	free(sc);
}

/* Largest error of the kernel's rows against the reference, relative to each
 * row's largest magnitude (elementwise relative error is meaningless for
 * entries near zero); lse relative to max(1, |lse|). */
static double max_rel_err(const problem *p, const float *o, const float *lse)
{
	uint32_t D = p->s.head_dim, H = p->s.q_heads;
	double *ro = malloc((size_t)H * D * sizeof(double)), *rl = malloc(H * sizeof(double));
	double worst = 0;
	for (uint32_t qi = 0; qi < p->nq; qi++) {
		reference(p, qi, ro, rl);
		for (uint32_t h = 0; h < H; h++) {
			const float *oh = o + ((size_t)qi * H + h) * D;
			float l = lse[(size_t)qi * H + h];
			if (isinf(rl[h])) {
				cr_assert(isinf(l) && l < 0, "empty query: lse %f, want -inf", l);
				for (uint32_t i = 0; i < D; i++)
					cr_assert(oh[i] == 0.0f, "empty query: o nonzero");
				continue;
			}
			double mag = 1e-30, err = 0;
			for (uint32_t i = 0; i < D; i++) {
				double r = ro[(size_t)h * D + i];
				mag = fmax(mag, fabs(r));
				cr_assert(isfinite(oh[i]), "non-finite output");
				err = fmax(err, fabs(oh[i] - r));
			}
			worst = fmax(worst, err / mag);
			worst = fmax(worst, fabs(l - rl[h]) / fmax(1.0, fabs(rl[h])));
		}
	}
	free(ro);
	free(rl);
	return worst;
}

static double tolerance(da_dtype t)
{
	return t == DA_F32 ? 1e-5 : 2e-3;
}

static da_shape shape(uint32_t hkv, uint32_t group, uint32_t D, uint32_t bt, da_dtype t)
{
	return (da_shape){.q_heads = hkv * group,
			  .kv_heads = hkv,
			  .head_dim = D,
			  .block_tokens = bt,
			  .layer = 1,
			  .kv_dtype = t,
			  .scale = 1.0f / sqrtf((float)D)};
}

/* Runs one random problem through a context and checks it. */
static void check_random(da_ctx *ctx, uint64_t *rng, da_shape s, uint32_t nq, uint32_t max_tokens,
			 float q_mag, double tol)
{
	uint32_t tokens[16];
	cr_assert(nq <= 16);
	for (uint32_t i = 0; i < nq; i++)
		tokens[i] = 1 + rng_below(rng, max_tokens);
	problem p = make_problem(rng, s, 2, nq, tokens, q_mag);
	da_batch b = batch_of(&p);
	size_t hd = (size_t)s.q_heads * s.head_dim;
	float *o = malloc(nq * hd * sizeof(float)), *lse = malloc(nq * s.q_heads * sizeof(float));
	int rc = da_partial_cpu(ctx, &s, &b, o, lse);
	cr_assert_eq(rc, 0, "da_partial_cpu: %d", rc);
	double err = max_rel_err(&p, o, lse);
	cr_assert(err <= tol,
		  "isa=%s dtype=%d G=%u Hkv=%u D=%u bt=%u nq=%u: max rel err %.3g > %.3g",
		  da_cpu_isa(), s.kv_dtype, s.q_heads / s.kv_heads, s.kv_heads, s.head_dim,
		  s.block_tokens, nq, err, tol);
	free(o);
	free(lse);
	free_problem(&p);
}

static void sweep(const char *isa)
{
	if (isa)
		setenv("KVMESH_DA_ISA", isa, 1);
	da_ctx *ctx;
	cr_assert_eq(da_ctx_create(2, &ctx), 0);
	uint64_t rng = 42;
	static const uint32_t groups[] = {1, 2, 3, 4, 5, 7, 8};
	static const da_dtype types[] = {DA_F32, DA_F16, DA_BF16};
	for (unsigned t = 0; t < 3; t++)
		for (unsigned g = 0; g < 7; g++)
			for (uint32_t D = 64; D <= 128; D += 64)
				for (uint32_t bt = 16; bt <= 64; bt *= 4) {
					uint32_t hkv = 1 + rng_below(&rng, 2);
					da_shape s = shape(hkv, groups[g], D, bt, types[t]);
					check_random(ctx, &rng, s, 1 + rng_below(&rng, 5), 40 * bt, 1.0f,
						     tolerance(types[t]));
				}
	da_ctx_destroy(ctx);
}

Test(distattn, matches_reference_all_dtypes_and_groups)
{
	sweep(NULL);
}

/* The AVX2 path, where the machine would otherwise pick AVX-512. */
Test(distattn, avx2_path_matches_reference)
{
	setenv("KVMESH_DA_ISA", "avx2", 1);
	if (strcmp(da_cpu_isa(), "avx2+f16c") != 0)
		cr_skip_test("this CPU has no AVX2/FMA/F16C (picked %s)", da_cpu_isa());
	sweep("avx2");
}

Test(distattn, portable_path_matches_reference)
{
	sweep("portable");
	cr_assert_str_eq(da_cpu_isa(), "portable");
}

Test(distattn, long_lists_up_to_300_blocks_many_queries)
{
	da_ctx *ctx;
	cr_assert_eq(da_ctx_create(3, &ctx), 0);
	uint64_t rng = 7;
	uint32_t tokens[12];
	for (int i = 0; i < 12; i++)
		tokens[i] = 1 + rng_below(&rng, 300 * 16);
	tokens[0] = 300 * 16;     /* 300 full blocks */
	tokens[1] = 299 * 16 + 3; /* a short tail */
	da_shape s = shape(2, 4, 128, 16, DA_F16);
	problem p = make_problem(&rng, s, 2, 12, tokens, 1.0f);
	da_batch b = batch_of(&p);
	float *o = malloc(12 * 8 * 128 * sizeof(float)), *lse = malloc(12 * 8 * sizeof(float));
	cr_assert_eq(da_partial_cpu(ctx, &s, &b, o, lse), 0);
	double err = max_rel_err(&p, o, lse);
	cr_assert(err <= 2e-3, "err %.3g", err);
	free(o);
	free(lse);
	free_problem(&p);
	da_ctx_destroy(ctx);
}

Test(distattn, odd_head_dim_uses_portable_loops)
{
	da_ctx *ctx;
	cr_assert_eq(da_ctx_create(1, &ctx), 0);
	uint64_t rng = 9;
	check_random(ctx, &rng, shape(2, 3, 36, 16, DA_F32), 3, 200, 1.0f, 1e-5);
	check_random(ctx, &rng, shape(1, 1, 7, 5, DA_BF16), 2, 60, 1.0f, 2e-3);
	da_ctx_destroy(ctx);
}

Test(distattn, large_scores_do_not_overflow)
{
	da_ctx *ctx;
	cr_assert_eq(da_ctx_create(2, &ctx), 0);
	uint64_t rng = 11;
	/* |q| up to 2000 makes scores of several hundred: exp() of them
	 * overflows fp32 without the max subtraction. */
	for (int i = 0; i < 4; i++) {
		check_random(ctx, &rng, shape(2, 4, 128, 16, DA_F32), 3, 1500, 2000.0f, 1e-4);
		check_random(ctx, &rng, shape(2, 2, 64, 64, DA_F16), 3, 1500, 2000.0f, 2e-3);
	}
	da_ctx_destroy(ctx);
}

Test(distattn, empty_lists_give_empty_state)
{
	da_ctx *ctx;
	cr_assert_eq(da_ctx_create(2, &ctx), 0);
	uint64_t rng = 3;
	uint32_t tokens[3] = {0, 37, 0};
	da_shape s = shape(2, 2, 64, 16, DA_F16);
	problem p = make_problem(&rng, s, 2, 3, tokens, 1.0f);
	da_batch b = batch_of(&p);
	float o[3 * 4 * 64], lse[3 * 4];
	memset(o, 0x7f, sizeof(o));
	cr_assert_eq(da_partial_cpu(ctx, &s, &b, o, lse), 0);
	cr_assert(max_rel_err(&p, o, lse) <= 2e-3);
	for (int h = 0; h < 4; h++)
		cr_assert(isinf(lse[h]) && lse[h] < 0 && isinf(lse[8 + h]));
	free_problem(&p);
	da_ctx_destroy(ctx);
}

/* ---- Merge ------------------------------------------------------------------ */

Test(merge, empty_with_empty_is_empty_not_nan)
{
	float o1[8] = {0}, o2[8] = {0}, l1[1] = {-INFINITY}, l2[1] = {-INFINITY};
	float out[8], lout[1];
	const float *os[2] = {o1, o2}, *ls[2] = {l1, l2};
	cr_assert_eq(da_merge_cpu(2, 1, 8, os, ls, out, lout), 0);
	cr_assert(isinf(lout[0]) && lout[0] < 0);
	for (int i = 0; i < 8; i++)
		cr_assert(out[i] == 0.0f);
	/* No parts at all is empty too. */
	cr_assert_eq(da_merge_cpu(0, 1, 8, NULL, NULL, out, lout), 0);
	cr_assert(isinf(lout[0]) && lout[0] < 0);
}

Test(merge, empty_is_identity)
{
	float o1[4] = {1, -2, 3, 0.5f}, l1[1] = {2.5f}, o2[4] = {0}, l2[1] = {-INFINITY};
	float out[4], lout[1];
	const float *os[2] = {o2, o1}, *ls[2] = {l2, l1};
	cr_assert_eq(da_merge_cpu(2, 1, 4, os, ls, out, lout), 0);
	cr_assert_float_eq(lout[0], 2.5f, 1e-6);
	for (int i = 0; i < 4; i++)
		cr_assert_float_eq(out[i], o1[i], 1e-6);
}

/* Random partials merged all at once, in random orders and random pairwise
 * groupings, all agree within 1e-5 relative. */
Test(merge, associative_in_any_order_and_grouping)
{
	enum { ROWS = 6, D = 64, N = 9 };
	uint64_t rng = 5;
	static float o[N][ROWS * D], l[N][ROWS];
	for (int trial = 0; trial < 50; trial++) {
		for (int j = 0; j < N; j++) {
			for (int i = 0; i < ROWS * D; i++)
				o[j][i] = ((int)rng_below(&rng, 2001) - 1000) / 100.0f;
			for (int r = 0; r < ROWS; r++)
				l[j][r] = rng_below(&rng, 5) == 0 ? -INFINITY
								 : ((int)rng_below(&rng, 4001) - 2000) / 20.0f;
		}
		const float *os[N], *ls[N];
		for (int j = 0; j < N; j++)
			os[j] = o[j], ls[j] = l[j];
		float ref[ROWS * D], lref[ROWS];
		cr_assert_eq(da_merge_cpu(N, ROWS, D, os, ls, ref, lref), 0);

		/* Random order, merged one at a time into an accumulator in place. */
		int perm[N];
		for (int j = 0; j < N; j++)
			perm[j] = j;
		for (int j = N - 1; j > 0; j--) {
			int k = (int)rng_below(&rng, j + 1), t = perm[j];
			perm[j] = perm[k], perm[k] = t;
		}
		float acc[ROWS * D], lacc[ROWS];
		memcpy(acc, o[perm[0]], sizeof(acc));
		memcpy(lacc, l[perm[0]], sizeof(lacc));
		for (int j = 1; j < N; j++) {
			const float *po[2] = {acc, o[perm[j]]}, *pl[2] = {lacc, l[perm[j]]};
			cr_assert_eq(da_merge_cpu(2, ROWS, D, po, pl, acc, lacc), 0);
		}
		/* Random grouping: merge a random split, then the two halves. */
		int cut = 1 + (int)rng_below(&rng, N - 1);
		float a[ROWS * D], la[ROWS], b[ROWS * D], lb[ROWS], c[ROWS * D], lc[ROWS];
		cr_assert_eq(da_merge_cpu(cut, ROWS, D, os, ls, a, la), 0);
		cr_assert_eq(da_merge_cpu(N - cut, ROWS, D, os + cut, ls + cut, b, lb), 0);
		const float *ho[2] = {b, a}, *hl[2] = {lb, la};
		cr_assert_eq(da_merge_cpu(2, ROWS, D, ho, hl, c, lc), 0);

		for (int r = 0; r < ROWS; r++) {
			float mag = 1e-30f;
			for (int i = 0; i < D; i++)
				mag = fmaxf(mag, fabsf(ref[r * D + i]));
			for (int i = 0; i < D; i++) {
				cr_assert(fabsf(acc[r * D + i] - ref[r * D + i]) <= 1e-5f * mag);
				cr_assert(fabsf(c[r * D + i] - ref[r * D + i]) <= 1e-5f * mag);
			}
			if (isinf(lref[r])) {
				cr_assert(isinf(lacc[r]) && isinf(lc[r]));
			} else {
				cr_assert(fabsf(lacc[r] - lref[r]) <= 1e-5f * fmaxf(1.0f, fabsf(lref[r])));
				cr_assert(fabsf(lc[r] - lref[r]) <= 1e-5f * fmaxf(1.0f, fabsf(lref[r])));
			}
		}
	}
}

/* The blocks of each query are dealt out to 1..8 "nodes" (any subset each,
 * the tail block wherever it falls); each node computes its partial over
 * its blocks; merged, they equal the single computation. */
Test(split, merged_nodes_equal_unsplit)
{
	da_ctx *ctx;
	cr_assert_eq(da_ctx_create(2, &ctx), 0);
	uint64_t rng = 13;
	static const da_dtype types[] = {DA_F32, DA_F16, DA_BF16};
	for (int trial = 0; trial < 24; trial++) {
		da_dtype t = types[trial % 3];
		da_shape s = shape(2, 1 + rng_below(&rng, 4), 64, trial % 2 ? 16 : 64, t);
		uint32_t tokens[1] = {1 + rng_below(&rng, 80 * s.block_tokens)};
		problem p = make_problem(&rng, s, 2, 1, tokens, 1.0f);
		size_t hd = (size_t)s.q_heads * s.head_dim;
		float *whole = malloc(hd * sizeof(float)), lwhole[32];
		da_batch b = batch_of(&p);
		cr_assert_eq(da_partial_cpu(ctx, &s, &b, whole, lwhole), 0);

		uint32_t nodes = 1 + trial % 8, nb = p.total_blocks;
		uint32_t *owner = malloc(nb * sizeof(uint32_t));
		for (uint32_t j = 0; j < nb; j++)
			owner[j] = rng_below(&rng, nodes);
		float *po = malloc(nodes * hd * sizeof(float)), *pl = malloc(nodes * s.q_heads * 4);
		const float *os[8], *ls[8];
		const void **mine = malloc(nb * sizeof(void *));
		for (uint32_t n = 0; n < nodes; n++) {
			uint32_t cnt = 0, ntok = 0;
			/* The tail block, if this node has it, goes last. */
			for (uint32_t j = 0; j < nb; j++)
				if (owner[j] == n && j + 1 < nb)
					mine[cnt++] = p.blocks[j], ntok += s.block_tokens;
			if (owner[nb - 1] == n)
				mine[cnt++] = p.blocks[nb - 1], ntok += tokens[0] - (nb - 1) * s.block_tokens;
			uint32_t st[2] = {0, cnt};
			da_batch nbatch = {.n_queries = 1,
					   .q = p.q,
					   .blocks = mine,
					   .block_start = st,
					   .n_tokens = &ntok,
					   .max_blocks = cnt};
			cr_assert_eq(da_partial_cpu(ctx, &s, &nbatch, po + n * hd, pl + n * s.q_heads), 0);
			os[n] = po + n * hd;
			ls[n] = pl + n * s.q_heads;
		}
		float *merged = malloc(hd * sizeof(float)), lmerged[32];
		cr_assert_eq(da_merge_cpu(nodes, s.q_heads, s.head_dim, os, ls, merged, lmerged), 0);
		double tol = 1e-5;
		for (uint32_t h = 0; h < s.q_heads; h++) {
			float mag = 1e-30f;
			for (uint32_t i = 0; i < s.head_dim; i++)
				mag = fmaxf(mag, fabsf(whole[h * s.head_dim + i]));
			for (uint32_t i = 0; i < s.head_dim; i++)
				cr_assert(fabsf(merged[h * s.head_dim + i] - whole[h * s.head_dim + i]) <=
						  tol * mag,
					  "trial %d nodes %u head %u", trial, nodes, h);
			cr_assert(fabsf(lmerged[h] - lwhole[h]) <= tol * fmaxf(1.0f, fabsf(lwhole[h])));
		}
		free(mine);
		free(owner);
		free(po);
		free(pl);
		free(merged);
		free(whole);
		free_problem(&p);
	}
	da_ctx_destroy(ctx);
}

/* Thread count changes only how work is cut, not the answer (within float
 * reassociation), and a context serves shapes of growing size. */
Test(distattn, thread_counts_agree)
{
	uint64_t rng = 17;
	uint32_t tokens[2] = {5000, 3100};
	da_shape s = shape(4, 2, 128, 16, DA_F16);
	problem p = make_problem(&rng, s, 2, 2, tokens, 1.0f);
	da_batch b = batch_of(&p);
	size_t n = 2 * 8 * 128;
	float *o1 = malloc(n * 4), *o4 = malloc(n * 4), l1[16], l4[16];
	da_ctx *c1, *c4;
	cr_assert_eq(da_ctx_create(1, &c1), 0);
	cr_assert_eq(da_ctx_create(4, &c4), 0);
	cr_assert_eq(da_ctx_threads(c4), 4);
	cr_assert_eq(da_partial_cpu(c1, &s, &b, o1, l1), 0);
	for (int rep = 0; rep < 3; rep++) {
		cr_assert_eq(da_partial_cpu(c4, &s, &b, o4, l4), 0);
		for (size_t i = 0; i < n; i++)
			cr_assert(fabsf(o1[i] - o4[i]) <= 1e-5f);
		for (int i = 0; i < 16; i++)
			cr_assert(fabsf(l1[i] - l4[i]) <= 1e-5f * fmaxf(1.0f, fabsf(l1[i])));
	}
	da_ctx_destroy(c1);
	da_ctx_destroy(c4);
	free(o1);
	free(o4);
	free_problem(&p);
}

/* ---- Bad arguments ---------------------------------------------------------- */

Test(args, bad_arguments_are_refused)
{
	da_ctx *ctx;
	cr_assert_eq(da_ctx_create(2, &ctx), 0);
	cr_assert_eq(da_ctx_create(2, NULL), -EINVAL);
	uint64_t rng = 1;
	uint32_t tokens[2] = {40, 17};
	da_shape good = shape(2, 2, 64, 16, DA_F16);
	problem p = make_problem(&rng, good, 2, 2, tokens, 1.0f);
	da_batch b = batch_of(&p);
	float o[2 * 4 * 64], lse[8];

	cr_assert_eq(da_partial_cpu(ctx, &good, &b, o, lse), 0);
	cr_assert_eq(da_partial_cpu(NULL, &good, &b, o, lse), -EINVAL);
	cr_assert_eq(da_partial_cpu(ctx, NULL, &b, o, lse), -EINVAL);
	cr_assert_eq(da_partial_cpu(ctx, &good, NULL, o, lse), -EINVAL);
	cr_assert_eq(da_partial_cpu(ctx, &good, &b, NULL, lse), -EINVAL);
	cr_assert_eq(da_partial_cpu(ctx, &good, &b, o, NULL), -EINVAL);

	da_shape s = good;
	s.q_heads = 5; /* does not divide by 2 kv heads */
	cr_assert_eq(da_partial_cpu(ctx, &s, &b, o, lse), -EINVAL);
	s = good, s.kv_heads = 0;
	cr_assert_eq(da_partial_cpu(ctx, &s, &b, o, lse), -EINVAL);
	s = good, s.head_dim = 0;
	cr_assert_eq(da_partial_cpu(ctx, &s, &b, o, lse), -EINVAL);
	s = good, s.head_dim = DA_MAX_HEAD_DIM + 1;
	cr_assert_eq(da_partial_cpu(ctx, &s, &b, o, lse), -EINVAL);
	s = good, s.block_tokens = 0;
	cr_assert_eq(da_partial_cpu(ctx, &s, &b, o, lse), -EINVAL);
	s = good, s.kv_dtype = (da_dtype)7;
	cr_assert_eq(da_partial_cpu(ctx, &s, &b, o, lse), -EINVAL);
	s = good, s.scale = NAN;
	cr_assert_eq(da_partial_cpu(ctx, &s, &b, o, lse), -EINVAL);
	s = good, s.scale = 0.0f;
	cr_assert_eq(da_partial_cpu(ctx, &s, &b, o, lse), -EINVAL);

	/* Token counts that do not match the block lists. */
	da_batch bad = b;
	uint32_t wrong[2] = {49, 17}; /* 49 tokens need 4 blocks, query 0 has 3 */
	bad.n_tokens = wrong;
	cr_assert_eq(da_partial_cpu(ctx, &good, &bad, o, lse), -EINVAL);
	uint32_t too_few[2] = {32, 17}; /* 3 blocks but the last would be empty */
	bad.n_tokens = too_few;
	cr_assert_eq(da_partial_cpu(ctx, &good, &bad, o, lse), -EINVAL);
	uint32_t nonzero_empty[2] = {40, 17};
	uint32_t st_empty[3] = {0, 0, 2};
	bad = b, bad.block_start = st_empty, bad.n_tokens = nonzero_empty;
	cr_assert_eq(da_partial_cpu(ctx, &good, &bad, o, lse), -EINVAL);
	uint32_t st_bad0[3] = {1, 3, 5};
	bad = b, bad.block_start = st_bad0;
	cr_assert_eq(da_partial_cpu(ctx, &good, &bad, o, lse), -EINVAL);
	uint32_t st_down[3] = {0, 3, 2};
	bad = b, bad.block_start = st_down;
	cr_assert_eq(da_partial_cpu(ctx, &good, &bad, o, lse), -EINVAL);
	void *saved = p.blocks[1];
	p.blocks[1] = NULL;
	cr_assert_eq(da_partial_cpu(ctx, &good, &b, o, lse), -EINVAL);
	p.blocks[1] = saved;
	bad = b, bad.q = NULL;
	cr_assert_eq(da_partial_cpu(ctx, &good, &bad, o, lse), -EINVAL);

	/* Merge. */
	const float *os[1] = {o}, *ls[1] = {lse};
	cr_assert_eq(da_merge_cpu(1, 1, 0, os, ls, o, lse), -EINVAL);
	cr_assert_eq(da_merge_cpu(1, 1, 64, NULL, ls, o, lse), -EINVAL);
	cr_assert_eq(da_merge_cpu(1, 1, 64, os, ls, NULL, lse), -EINVAL);
	const float *onull[1] = {NULL};
	cr_assert_eq(da_merge_cpu(1, 1, 64, onull, ls, o, lse), -EINVAL);

	/* A bad shape has no block size. */
	cr_assert_eq(da_block_bytes(&s, 2), 0, "bad shape has no block size");
	free_problem(&p);
	da_ctx_destroy(ctx);
}
