/* GPU DistAttention test: da_partial_cuda and da_merge_cuda against the CPU
 * path (da_partial_cpu, da_merge_cpu) on the same random inputs.
 *
 * Bars: max relative error <= 1e-5 for fp32 KV and <= 2e-3 for fp16/bf16,
 * relative to each row's output magnitude (o) and to max(1, |lse|) (lse).
 * Empty rows must be exactly (0, -inf). Ends with "N passed, N failed";
 * exits 1 on any failure and 2 where no CUDA device is present.
 *
 *   test_distattn_gpu [-v] [-s SEED] [-f SUBSTRING]
 *   -v: print every case; -s: random seed; -f: only cases whose names hold it */
#include "common/kvm_error.h"
#include "kernels/distattn.h"

#include <cuda_runtime_api.h>

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned n_passed, n_failed;
static bool verbose;
static const char *filter;

static bool wanted(const char *name)
{
	return !filter || strstr(name, filter);
}
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dull;
}

/* Uniform in [-1, 1). */
static float rnd(void)
{
	return (float)((rng() >> 40) * (1.0 / (1ull << 23)) - 1.0);
}

static uint32_t rnd_below(uint32_t n)
{
	return n ? (uint32_t)(rng() % n) : 0;
}

/* fp32 to fp16 / bf16 bits, round to nearest even (finite, in-range inputs). */
static uint16_t f32_to_f16(float f)
{
	uint32_t x;
	memcpy(&x, &f, 4);
	uint32_t sign = (x >> 16) & 0x8000u;
	int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
	uint32_t man = x & 0x7fffffu;
	if (exp >= 31)
		return (uint16_t)(sign | 0x7c00u);
	if (exp <= 0) { /* subnormal or zero */
		if (exp < -10)
			return (uint16_t)sign;
		man |= 0x800000u;
		uint32_t shift = (uint32_t)(14 - exp);
		uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
		if (rem > half || (rem == half && (h & 1)))
			h++;
		return (uint16_t)(sign | h);
	}
	uint32_t h = ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1fffu;
	if (rem > 0x1000u || (rem == 0x1000u && (h & 1)))
		h++; /* may carry into the exponent, which is right */
	return (uint16_t)(sign | h);
}

static uint16_t f32_to_bf16(float f)
{
	uint32_t x;
	memcpy(&x, &f, 4);
	x += 0x7fffu + ((x >> 16) & 1);
	return (uint16_t)(x >> 16);
}

static void check(bool ok, const char *name, const char *fmt, double a, double b)
{
	if (ok)
		n_passed++;
	else
		n_failed++;
	if (!ok || verbose) {
		printf("%s %s ", ok ? "ok  " : "FAIL", name);
		printf(fmt, a, b);
		printf("\n");
	}
	fflush(stdout);
}

#define CUDA_OK(call)                                                                          \
	do {                                                                                   \
		cudaError_t e_ = (call);                                                       \
		if (e_ != cudaSuccess) {                                                       \
			fprintf(stderr, "level=error test=%s op=%s cuda_error=\"%s\"\n", name, \
				#call, cudaGetErrorString(e_));                                \
			rc = -EIO;                                                             \
			goto out;                                                              \
		}                                                                              \
	} while (0)

/* Compares rows of (o, lse); returns the largest relative error, or INFINITY
 * for a NaN or an empty-state mismatch. Rows where want_nan[row] expect NaN. */
static double compare_rows(const float *o_got, const float *lse_got, const float *o_want,
			   const float *lse_want, size_t rows, uint32_t d)
{
	double worst = 0.0;
	for (size_t r = 0; r < rows; r++) {
		const float *og = o_got + r * d, *ow = o_want + r * d;
		if (isinf(lse_want[r]) && lse_want[r] < 0) {
			if (!(isinf(lse_got[r]) && lse_got[r] < 0))
				return INFINITY;
			for (uint32_t e = 0; e < d; e++)
				if (og[e] != 0.0f)
					return INFINITY;
			continue;
		}
		if (!isfinite(lse_got[r]))
			return INFINITY;
		double mag = 1e-30, err = 0.0;
		for (uint32_t e = 0; e < d; e++) {
			if (!isfinite(og[e]))
				return INFINITY;
			mag = fmax(mag, fabs(ow[e]));
			err = fmax(err, fabs((double)og[e] - ow[e]));
		}
		worst = fmax(worst, err / mag);
		worst = fmax(worst, fabs((double)lse_got[r] - lse_want[r]) / fmax(1.0, fabs(lse_want[r])));
	}
	return worst;
}

typedef struct pcase {
	char name[96];
	da_shape s;
	uint32_t layers;
	uint32_t n_queries;
	uint32_t max_list;    /* list lengths random in 0..max_list */
	const uint32_t *lens; /* or these n_queries lengths */
	uint32_t misalign;    /* bytes added to every block address */
	float qmag;
	uint32_t short_max;   /* if nonzero: max_blocks given to the GPU (too small on purpose) */
	bool null_block;      /* one list's first block address is NULL on the GPU */
} pcase;

/* One partial-attention case; counts one test. Returns 0 or a negative code
 * for a set-up failure (which also counts as a failed test). */
static int run_partial(da_ctx *cctx, da_cuda_ctx *gctx, const pcase *c)
{
	const char *name = c->name;
	if (!wanted(name))
		return 0;
	const da_shape *s = &c->s;
	const uint32_t nq = c->n_queries, hq = s->q_heads, d = s->head_dim;
	const size_t esz = da_dtype_size(s->kv_dtype);
	const size_t bbytes = da_block_bytes(s, c->layers);
	const size_t stride = (bbytes + c->misalign + 255) / 256 * 256;
	const uint32_t pool = 48;
	int rc = 0;

	uint32_t *start = calloc(nq + 1, sizeof(uint32_t)), *ntok = calloc(nq, sizeof(uint32_t));
	unsigned char *hblk = malloc(pool * stride);
	float *q = malloc((size_t)nq * hq * d * sizeof(float));
	float *o_cpu = malloc((size_t)nq * hq * d * sizeof(float));
	float *lse_cpu = malloc((size_t)nq * hq * sizeof(float));
	float *o_gpu = malloc((size_t)nq * hq * d * sizeof(float));
	float *lse_gpu = malloc((size_t)nq * hq * sizeof(float));
	const void **hptr = NULL, **dptr = NULL;
	unsigned char *dblk = NULL;
	float *dq = NULL, *d_o = NULL, *d_lse = NULL;
	uint32_t *dstart = NULL, *dntok = NULL;
	void *dptrs = NULL;
	if (!start || !ntok || !hblk || !q || !o_cpu || !lse_cpu || !o_gpu || !lse_gpu) {
		rc = -ENOMEM;
		goto out;
	}

	/* Lists: random lengths (query 1 empty when there are 3 or more), random
	 * tails, blocks drawn from a shared pool. */
	uint32_t max_blocks = 0;
	for (uint32_t i = 0; i < nq; i++) {
		uint32_t nb = c->lens ? c->lens[i] : rnd_below(c->max_list + 1);
		if (!c->lens && nq >= 3 && i == 1)
			nb = 0;
		start[i + 1] = start[i] + nb;
		ntok[i] = nb ? (nb - 1) * s->block_tokens + 1 + rnd_below(s->block_tokens) : 0;
		if (nb > max_blocks)
			max_blocks = nb;
	}
	const uint32_t total = start[nq];
	hptr = malloc((total + 1) * sizeof(void *));
	dptr = malloc((total + 1) * sizeof(void *));
	if (!hptr || !dptr) {
		rc = -ENOMEM;
		goto out;
	}

	for (size_t i = 0; i < pool * stride / esz; i++) {
		float v = rnd();
		if (esz == 4)
			memcpy(hblk + i * 4, &v, 4);
		else {
			uint16_t h = s->kv_dtype == DA_F16 ? f32_to_f16(v) : f32_to_bf16(v);
			memcpy(hblk + i * 2, &h, 2);
		}
	}
	for (size_t i = 0; i < (size_t)nq * hq * d; i++)
		q[i] = rnd() * c->qmag;

	CUDA_OK(cudaMalloc((void **)&dblk, pool * stride));
	CUDA_OK(cudaMemcpy(dblk, hblk, pool * stride, cudaMemcpyHostToDevice));
	for (uint32_t j = 0; j < total; j++) {
		size_t off = rnd_below(pool) * stride + c->misalign;
		hptr[j] = hblk + off;
		dptr[j] = dblk + off;
	}
	/* The first non-empty list gets a NULL block: the GPU must flag that
	 * query with NaN, not fault (the CPU path rejects such a batch). */
	uint32_t null_q = UINT32_MAX;
	for (uint32_t i = 0; c->null_block && i < nq && null_q == UINT32_MAX; i++)
		if (start[i + 1] > start[i])
			null_q = i;

	da_batch hb = {.n_queries = nq,
		       .q = q,
		       .blocks = hptr,
		       .block_start = start,
		       .n_tokens = ntok,
		       .max_blocks = max_blocks};
	rc = da_partial_cpu(cctx, s, &hb, o_cpu, lse_cpu);
	if (null_q != UINT32_MAX)
		dptr[start[null_q]] = NULL;
	if (rc != 0) {
		fprintf(stderr, "level=error test=%s op=da_partial_cpu err=\"%s\"\n", name,
			kvm_strerror(rc));
		goto out;
	}

	CUDA_OK(cudaMalloc((void **)&dq, (size_t)nq * hq * d * sizeof(float)));
	CUDA_OK(cudaMalloc((void **)&d_o, (size_t)nq * hq * d * sizeof(float)));
	CUDA_OK(cudaMalloc((void **)&d_lse, (size_t)nq * hq * sizeof(float)));
	CUDA_OK(cudaMalloc((void **)&dstart, (nq + 1) * sizeof(uint32_t)));
	CUDA_OK(cudaMalloc((void **)&dntok, nq * sizeof(uint32_t)));
	CUDA_OK(cudaMalloc(&dptrs, (total + 1) * sizeof(void *)));
	CUDA_OK(cudaMemcpy(dq, q, (size_t)nq * hq * d * sizeof(float), cudaMemcpyHostToDevice));
	CUDA_OK(cudaMemcpy(dstart, start, (nq + 1) * sizeof(uint32_t), cudaMemcpyHostToDevice));
	CUDA_OK(cudaMemcpy(dntok, ntok, nq * sizeof(uint32_t), cudaMemcpyHostToDevice));
	CUDA_OK(cudaMemcpy(dptrs, dptr, (total + 1) * sizeof(void *), cudaMemcpyHostToDevice));
	/* Poison the outputs so that a row the kernel forgets shows. */
	CUDA_OK(cudaMemset(d_o, 0xff, (size_t)nq * hq * d * sizeof(float)));
	CUDA_OK(cudaMemset(d_lse, 0xff, (size_t)nq * hq * sizeof(float)));

	da_batch db = {.n_queries = nq,
		       .q = dq,
		       .blocks = (const void *const *)dptrs,
		       .block_start = dstart,
		       .n_tokens = dntok,
		       .max_blocks = c->short_max ? c->short_max : max_blocks};
	rc = da_partial_cuda(gctx, s, &db, d_o, d_lse, NULL);
	if (rc != 0) {
		fprintf(stderr, "level=error test=%s op=da_partial_cuda err=\"%s\"\n", name,
			kvm_strerror(rc));
		goto out;
	}
	CUDA_OK(cudaDeviceSynchronize());
	CUDA_OK(cudaMemcpy(o_gpu, d_o, (size_t)nq * hq * d * sizeof(float), cudaMemcpyDeviceToHost));
	CUDA_OK(cudaMemcpy(lse_gpu, d_lse, (size_t)nq * hq * sizeof(float), cudaMemcpyDeviceToHost));

	/* Rows of malformed lists must be NaN; the others must match. */
	double err = 0.0;
	bool nan_ok = true;
	for (uint32_t i = 0; i < nq; i++) {
		const size_t r0 = (size_t)i * hq;
		const bool want_nan = (c->short_max && start[i + 1] - start[i] > c->short_max) ||
				      i == null_q;
		if (want_nan) {
			for (uint32_t h = 0; h < hq; h++)
				nan_ok &= isnan(lse_gpu[r0 + h]) && isnan(o_gpu[(r0 + h) * d]);
			continue;
		}
		err = fmax(err, compare_rows(o_gpu + r0 * d, lse_gpu + r0, o_cpu + r0 * d,
					     lse_cpu + r0, hq, d));
	}
	const double bar = s->kv_dtype == DA_F32 ? 1e-5 : 2e-3;
	check(err <= bar && nan_ok, name, "max_rel_err=%.3g bar=%.0e", err, bar);
	rc = 0;
	goto done;

out:
	n_failed++;
	printf("FAIL %s set-up error: %s\n", name, kvm_strerror(rc));
done:
	cudaFree(dblk);
	cudaFree(dq);
	cudaFree(d_o);
	cudaFree(d_lse);
	cudaFree(dstart);
	cudaFree(dntok);
	cudaFree(dptrs);
	free(start);
	free(ntok);
	free(hblk);
	free(q);
	free(o_cpu);
	free(lse_cpu);
	free(o_gpu);
	free(lse_gpu);
	free(hptr);
	free(dptr);
	return rc;
}

static da_shape shape(uint32_t hq, uint32_t hkv, uint32_t d, uint32_t bt, da_dtype t)
{
	da_shape s = {.q_heads = hq,
		      .kv_heads = hkv,
		      .head_dim = d,
		      .block_tokens = bt,
		      .layer = 0,
		      .kv_dtype = t,
		      .scale = 1.0f / sqrtf((float)d)};
	return s;
}

static const char *dtype_name(da_dtype t)
{
	return t == DA_F32 ? "f32" : t == DA_F16 ? "f16" : "bf16";
}

static void partial_cases(da_ctx *cctx, da_cuda_ctx *gctx)
{
	static const uint32_t heads[][2] = {{8, 8}, {8, 4}, {16, 4}, {10, 2}, {14, 2}, {32, 4}, {8, 1}};
	static const da_dtype types[] = {DA_F32, DA_F16, DA_BF16};
	static const uint32_t dims[] = {64, 128}, bts[] = {16, 64};

	/* The grid of the issue: dtype x head_dim x block_tokens x group size. */
	for (size_t ti = 0; ti < 3; ti++)
		for (size_t di = 0; di < 2; di++)
			for (size_t bi = 0; bi < 2; bi++)
				for (size_t hi = 0; hi < sizeof(heads) / sizeof(heads[0]); hi++) {
					pcase c = {.s = shape(heads[hi][0], heads[hi][1], dims[di],
							      bts[bi], types[ti]),
						   .layers = 2,
						   .n_queries = 1 + rnd_below(9),
						   .max_list = 40,
						   .qmag = 1.0f};
					c.s.layer = 1;
					snprintf(c.name, sizeof(c.name),
						 "partial/%s/d%u/bt%u/hq%u-hkv%u/nq%u", dtype_name(types[ti]),
						 dims[di], bts[bi], heads[hi][0], heads[hi][1], c.n_queries);
					run_partial(cctx, gctx, &c);
				}

	/* Long lists (the split path), lists of different lengths, many short
	 * queries (the direct path), odd shapes, misaligned blocks, malformed
	 * lists. */
	static const uint32_t long1[] = {2048};
	static const uint32_t mixed[] = {0, 1, 500, 3000, 37, 2};
	struct {
		const char *name;
		uint32_t hq, hkv, d, bt;
		da_dtype t;
		uint32_t nq, max_list;
		const uint32_t *lens;
		uint32_t misalign, short_max;
		bool null_block;
		float qmag;
	} sp[] = {
		{"long32k/f16/gqa8", 32, 4, 128, 16, DA_F16, 1, 0, long1, 0, 0, false, 1},
		{"long32k/f16/mha", 32, 32, 128, 16, DA_F16, 1, 0, long1, 0, 0, false, 1},
		{"long32k/f32/gqa4", 32, 8, 128, 16, DA_F32, 1, 0, long1, 0, 0, false, 1},
		{"mixed/bf16/hq8-hkv2", 8, 2, 128, 16, DA_BF16, 6, 0, mixed, 0, 0, false, 1},
		{"mixed/f32/mqa", 8, 1, 64, 16, DA_F32, 6, 0, mixed, 0, 0, false, 1},
		{"many/f16/600q", 8, 2, 128, 16, DA_F16, 600, 8, NULL, 0, 0, false, 1},
		{"many/f32/300q", 32, 8, 64, 64, DA_F32, 300, 4, NULL, 0, 0, false, 1},
		{"mqa32/f16", 32, 1, 128, 16, DA_F16, 3, 60, NULL, 0, 0, false, 1},
		{"mqa256/bf16", 256, 1, 64, 16, DA_BF16, 2, 20, NULL, 0, 0, false, 1},
		{"mha256/f16", 256, 256, 64, 16, DA_F16, 2, 10, NULL, 0, 0, false, 1},
		{"d100/f16", 8, 2, 100, 16, DA_F16, 4, 30, NULL, 0, 0, false, 1},
		{"d36/f32", 12, 4, 36, 16, DA_F32, 4, 30, NULL, 0, 0, false, 1},
		{"d8/f16", 8, 8, 8, 16, DA_F16, 4, 30, NULL, 0, 0, false, 1},
		{"d1/f32", 4, 2, 1, 16, DA_F32, 4, 30, NULL, 0, 0, false, 1},
		{"d256/bf16/gqa5", 10, 2, 256, 16, DA_BF16, 3, 30, NULL, 0, 0, false, 1},
		{"d512/f16/gqa7", 7, 1, 512, 16, DA_F16, 3, 20, NULL, 0, 0, false, 1},
		{"d512/f32/gqa4", 8, 2, 512, 16, DA_F32, 3, 20, NULL, 0, 0, false, 1},
		{"d320/f32/gqa2", 4, 2, 320, 16, DA_F32, 3, 20, NULL, 0, 0, false, 1},
		{"d200/f32/gqa8", 8, 1, 200, 16, DA_F32, 3, 20, NULL, 0, 0, false, 1},
		{"bt1/f16", 8, 2, 128, 1, DA_F16, 4, 300, NULL, 0, 0, false, 1},
		{"bt7/bf16", 8, 4, 64, 7, DA_BF16, 4, 100, NULL, 0, 0, false, 1},
		{"bt4096/f16", 4, 1, 128, 4096, DA_F16, 3, 3, NULL, 0, 0, false, 1},
		{"misalign2/f16", 8, 2, 128, 16, DA_F16, 4, 30, NULL, 2, 0, false, 1},
		{"misalign4/f32", 8, 8, 64, 16, DA_F32, 4, 30, NULL, 4, 0, false, 1},
		{"misalign8/bf16", 16, 2, 128, 64, DA_BF16, 4, 30, NULL, 8, 0, false, 1},
		{"bigscores/f32", 8, 2, 128, 16, DA_F32, 4, 60, NULL, 0, 0, false, 8},
		{"bigscores/f16", 8, 2, 128, 16, DA_F16, 4, 60, NULL, 0, 0, false, 8},
		{"short_max/nan", 8, 2, 64, 16, DA_F16, 6, 0, mixed, 0, 40, false, 1},
		{"null_block/nan", 8, 2, 64, 16, DA_F32, 6, 0, mixed, 0, 0, true, 1},
	};
	for (size_t i = 0; i < sizeof(sp) / sizeof(sp[0]); i++) {
		pcase c = {.s = shape(sp[i].hq, sp[i].hkv, sp[i].d, sp[i].bt, sp[i].t),
			   .layers = 1,
			   .n_queries = sp[i].nq,
			   .max_list = sp[i].max_list,
			   .lens = sp[i].lens,
			   .misalign = sp[i].misalign,
			   .qmag = sp[i].qmag,
			   .short_max = sp[i].short_max,
			   .null_block = sp[i].null_block};
		snprintf(c.name, sizeof(c.name), "partial/%s", sp[i].name);
		run_partial(cctx, gctx, &c);
	}
}

/* One merge case: n_parts random partial states (some rows empty, some
 * all-empty), GPU against CPU; `in_place` writes over part 0. */
static int run_merge(uint32_t n_parts, uint32_t rows, uint32_t d, bool in_place, double p_empty)
{
	char name[96];
	snprintf(name, sizeof(name), "merge/n%u/rows%u/d%u%s", n_parts, rows, d,
		 in_place ? "/in-place" : "");
	if (!wanted(name))
		return 0;
	int rc = 0;
	const size_t on = (size_t)rows * d;
	float *ho = malloc((n_parts + 1) * on * sizeof(float));
	float *hl = malloc((n_parts + 1) * (size_t)rows * sizeof(float));
	float *go = malloc(on * sizeof(float)), *gl = malloc(rows * sizeof(float));
	const float **hop = malloc((n_parts + 1) * sizeof(float *));
	const float **hlp = malloc((n_parts + 1) * sizeof(float *));
	const float **dop = malloc((n_parts + 1) * sizeof(float *));
	const float **dlp = malloc((n_parts + 1) * sizeof(float *));
	float *dbo = NULL, *dbl = NULL, *co = NULL, *cl = NULL;
	void *dopa = NULL, *dlpa = NULL;
	if (!ho || !hl || !go || !gl || !hop || !hlp || !dop || !dlp) {
		rc = -ENOMEM;
		goto out;
	}
	for (uint32_t j = 0; j < n_parts; j++)
		for (uint32_t r = 0; r < rows; r++) {
			bool empty = (r % 7 == 3) || rnd() * 0.5 + 0.5 < p_empty;
			hl[(size_t)j * rows + r] = empty ? -INFINITY : 20.0f * rnd();
			for (uint32_t e = 0; e < d; e++)
				ho[j * on + (size_t)r * d + e] = empty ? 0.0f : rnd();
		}
	CUDA_OK(cudaMalloc((void **)&dbo, (n_parts + 1) * on * sizeof(float)));
	CUDA_OK(cudaMalloc((void **)&dbl, (n_parts + 1) * (size_t)rows * sizeof(float)));
	CUDA_OK(cudaMemcpy(dbo, ho, (n_parts + 1) * on * sizeof(float), cudaMemcpyHostToDevice));
	CUDA_OK(cudaMemcpy(dbl, hl, (n_parts + 1) * (size_t)rows * sizeof(float),
			   cudaMemcpyHostToDevice));
	for (uint32_t j = 0; j < n_parts; j++) {
		hop[j] = ho + j * on;
		hlp[j] = hl + (size_t)j * rows;
		dop[j] = dbo + j * on;
		dlp[j] = dbl + (size_t)j * rows;
	}
	CUDA_OK(cudaMalloc(&dopa, (n_parts + 1) * sizeof(float *)));
	CUDA_OK(cudaMalloc(&dlpa, (n_parts + 1) * sizeof(float *)));
	CUDA_OK(cudaMemcpy(dopa, dop, (n_parts + 1) * sizeof(float *), cudaMemcpyHostToDevice));
	CUDA_OK(cudaMemcpy(dlpa, dlp, (n_parts + 1) * sizeof(float *), cudaMemcpyHostToDevice));

	/* CPU result into the spare slot n_parts; GPU in place or into its own. */
	co = ho + n_parts * on;
	cl = hl + (size_t)n_parts * rows;
	rc = da_merge_cpu(n_parts, rows, d, hop, hlp, co, cl);
	if (rc != 0)
		goto out;
	float *gdo = in_place && n_parts ? dbo : dbo + n_parts * on;
	float *gdl = in_place && n_parts ? dbl : dbl + (size_t)n_parts * rows;
	rc = da_merge_cuda(n_parts, rows, d, (const float *const *)dopa,
			   (const float *const *)dlpa, gdo, gdl, NULL);
	if (rc != 0)
		goto out;
	CUDA_OK(cudaDeviceSynchronize());
	CUDA_OK(cudaMemcpy(go, gdo, on * sizeof(float), cudaMemcpyDeviceToHost));
	CUDA_OK(cudaMemcpy(gl, gdl, rows * sizeof(float), cudaMemcpyDeviceToHost));
	double err = compare_rows(go, gl, co, cl, rows, d);
	check(err <= 1e-5, name, "max_rel_err=%.3g bar=%.0e", err, 1e-5);
	rc = 0;
	goto done;
out:
	n_failed++;
	printf("FAIL %s set-up error: %s\n", name, kvm_strerror(rc));
done:
	cudaFree(dbo);
	cudaFree(dbl);
	cudaFree(dopa);
	cudaFree(dlpa);
	free(ho);
	free(hl);
	free(go);
	free(gl);
	free(hop);
	free(hlp);
	free(dop);
	free(dlp);
	return rc;
}

/* Bad arguments: each must return the code, never crash. */
static void arg_cases(da_cuda_ctx *gctx)
{
	if (!wanted("args/"))
		return;
	da_shape good = shape(8, 2, 64, 16, DA_F16), bad = shape(6, 4, 64, 16, DA_F16);
	float *dq = NULL;
	if (cudaMalloc((void **)&dq, 4096 * sizeof(float)) != cudaSuccess) {
		n_failed++;
		printf("FAIL args set-up\n");
		return;
	}
	const void *const *blocks = (const void *const *)dq; /* never read: rejected first */
	const uint32_t *u32 = (const uint32_t *)dq;
	da_batch b = {.n_queries = 1, .q = dq, .blocks = blocks, .block_start = u32, .n_tokens = u32,
		      .max_blocks = 1};
	da_batch b0 = b, bq = b, bmax = b;
	b0.n_queries = 0;
	bq.q = NULL;
	bmax.max_blocks = UINT32_MAX;
	struct {
		const char *name;
		int got, want;
	} t[] = {
		{"args/null-ctx", da_partial_cuda(NULL, &good, &b, dq, dq, NULL), -EINVAL},
		{"args/null-shape", da_partial_cuda(gctx, NULL, &b, dq, dq, NULL), -EINVAL},
		{"args/bad-shape", da_partial_cuda(gctx, &bad, &b, dq, dq, NULL), -EINVAL},
		{"args/null-batch", da_partial_cuda(gctx, &good, NULL, dq, dq, NULL), -EINVAL},
		{"args/null-q", da_partial_cuda(gctx, &good, &bq, dq, dq, NULL), -EINVAL},
		{"args/null-o", da_partial_cuda(gctx, &good, &b, NULL, dq, NULL), -EINVAL},
		{"args/null-lse", da_partial_cuda(gctx, &good, &b, dq, NULL, NULL), -EINVAL},
		{"args/max-blocks", da_partial_cuda(gctx, &good, &bmax, dq, dq, NULL), -EINVAL},
		{"args/no-queries", da_partial_cuda(gctx, &good, &b0, NULL, NULL, NULL), 0},
		{"args/merge-d0", da_merge_cuda(1, 1, 0, (const float *const *)blocks,
						(const float *const *)blocks, dq, dq, NULL), -EINVAL},
		{"args/merge-null-out", da_merge_cuda(1, 1, 8, (const float *const *)blocks,
						      (const float *const *)blocks, NULL, dq, NULL),
		 -EINVAL},
		{"args/merge-null-parts", da_merge_cuda(2, 1, 8, NULL, NULL, dq, dq, NULL), -EINVAL},
		{"args/merge-no-rows", da_merge_cuda(1, 0, 8, (const float *const *)blocks,
						     (const float *const *)blocks, dq, dq, NULL), 0},
	};
	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++)
		check(t[i].got == t[i].want, t[i].name, "rc=%g want=%g", t[i].got, t[i].want);
	check(cudaDeviceSynchronize() == cudaSuccess, "args/device-still-healthy", "%g%g", 0, 0);
	cudaFree(dq);
}

int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "-v"))
			verbose = true;
		else if (!strcmp(argv[i], "-s") && i + 1 < argc)
			rng_state = strtoull(argv[++i], NULL, 0) | 1;
		else if (!strcmp(argv[i], "-f") && i + 1 < argc)
			filter = argv[++i];
		else {
			fprintf(stderr, "usage: %s [-v] [-s SEED] [-f SUBSTRING]\n", argv[0]);
			return 2;
		}
	}
	int n_dev = 0;
	cudaError_t e = cudaGetDeviceCount(&n_dev);
	if (e != cudaSuccess || n_dev == 0) {
		fprintf(stderr,
			"level=error test=distattn_gpu msg=\"no CUDA device present; test-gpu needs a GPU\" "
			"cuda_error=\"%s\"\n",
			e != cudaSuccess ? cudaGetErrorString(e) : "device count is 0");
		return 2;
	}
	struct cudaDeviceProp prop;
	if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
		printf("device=\"%s\" sm=%d.%d multiprocessors=%d seed=%#llx\n", prop.name, prop.major,
		       prop.minor, prop.multiProcessorCount, (unsigned long long)rng_state);

	da_ctx *cctx = NULL;
	da_cuda_ctx *gctx = NULL;
	int rc = da_ctx_create(0, &cctx);
	if (rc == 0)
		rc = da_cuda_ctx_create(&gctx);
	if (rc != 0) {
		fprintf(stderr, "level=error test=distattn_gpu op=ctx_create err=\"%s\"\n",
			kvm_strerror(rc));
		da_ctx_destroy(cctx);
		return 1;
	}

	arg_cases(gctx);
	partial_cases(cctx, gctx);
	static const uint32_t np[] = {0, 1, 2, 3, 5, 8, 33};
	for (size_t i = 0; i < sizeof(np) / sizeof(np[0]); i++) {
		run_merge(np[i], 1 + rnd_below(300), 128, false, 0.2);
		run_merge(np[i], 1 + rnd_below(300), 100, true, 0.2);
	}
	run_merge(4, 64, 64, false, 1.0); /* empty with empty: empty, no NaN */
	run_merge(4, 64, 64, true, 1.0);
	run_merge(3, 5000, 512, false, 0.3);

	da_cuda_ctx_destroy(gctx);
	da_ctx_destroy(cctx);
	printf("%u passed, %u failed\n", n_passed, n_failed);
	return n_failed ? 1 : 0;
}
