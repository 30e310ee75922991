/* DistAttention on the CPU: argument checks, the thread pool, work items and
 * the online-softmax driver around the per-ISA inner loops, and the merge.
 *
 * A call is cut into work items (query, range of its blocks). Each item runs
 * the online softmax over its blocks one block at a time, scores for the whole
 * block first so the running max moves once per block, not once per token,
 * and leaves a partial (o, lse). Items of one query then merge in a fixed
 * order, so a result does not depend on which thread ran what. */
#include "kernels/distattn.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/distattn_impl.h"

/* An item covers at least this many tokens, so that its fixed costs (scaling
 * q, writing and merging a partial) stay small next to its KV reads. */
#define DA_MIN_ITEM_TOKENS 512
/* Items per thread for a single long query, to even out the load. */
#define DA_ITEMS_PER_THREAD 4
#define DA_ALIGN 64

size_t da_dtype_size(da_dtype t)
{
	switch (t) {
	case DA_F32:
		return 4;
	case DA_F16:
	case DA_BF16:
		return 2;
	}
	return 0;
}

int da_shape_check(const da_shape *s)
{
	if (!s)
		return -EINVAL;
	if (s->q_heads == 0 || s->kv_heads == 0 || s->q_heads > DA_MAX_HEADS ||
	    s->kv_heads > s->q_heads || s->q_heads % s->kv_heads != 0)
		return -EINVAL;
	if (s->head_dim == 0 || s->head_dim > DA_MAX_HEAD_DIM)
		return -EINVAL;
	if (s->block_tokens == 0 || s->block_tokens > DA_MAX_BLOCK_TOKENS)
		return -EINVAL;
	if (da_dtype_size(s->kv_dtype) == 0)
		return -EINVAL;
	if (!isfinite(s->scale) || s->scale <= 0.0f)
		return -EINVAL;
	return 0;
}

/* Bytes of one layer's K (or V) of one block. */
static size_t half_layer_bytes(const da_shape *s)
{
	return (size_t)s->block_tokens * s->kv_heads * s->head_dim * da_dtype_size(s->kv_dtype);
}

size_t da_block_bytes(const da_shape *s, uint32_t layers)
{
	if (da_shape_check(s) != 0)
		return 0;
	return 2 * half_layer_bytes(s) * layers;
}

/* ---- ISA choice ------------------------------------------------------------ */

/* The fastest instruction sets this CPU has, best first, ending with the
 * portable loops. KVMESH_DA_ISA=avx2 or =portable caps the choice, so tests
 * and benchmarks can compare paths on one machine. */
static int usable_isas(const da_isa *out[3])
{
	const char *cap = getenv("KVMESH_DA_ISA");
	int n = 0;
#if defined(__x86_64__)
	__builtin_cpu_init();
	bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
		    __builtin_cpu_supports("f16c");
	bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
	if (cap && strcmp(cap, "portable") == 0)
		avx2 = avx512 = false;
	if (cap && strcmp(cap, "avx2") == 0)
		avx512 = false;
	if (avx512)
		out[n++] = &da_isa_avx512;
	if (avx2)
		out[n++] = &da_isa_avx2;
#endif
	(void)cap;
	out[n++] = &da_isa_portable;
	return n;
}

const char *da_cpu_isa(void)
{
	const da_isa *isas[3];
	usable_isas(isas);
	return isas[0]->name;
}

/* ---- Context and thread pool ---------------------------------------------- */

/* One work item: blocks [first, first + count) of query `query`. */
typedef struct da_item {
	uint32_t query;
	uint32_t first, count;
	uint32_t last_tokens; /* valid tokens in the item's last block */
	float *o, *lse;       /* where its partial goes */
} da_item;

typedef struct da_job {
	const da_shape *shape;
	const da_batch *batch;
	da_dims dims;
	const da_isa *isa;
	size_t k_offset, v_offset; /* byte offsets of the layer's K and V in a block */
	const da_item *items;
	uint32_t n_items;
} da_job;

struct da_ctx {
	unsigned n_threads;
	const da_isa *isas[3]; /* usable, best first; the last is portable */
	int n_isas;
	pthread_t *workers; /* n_threads - 1 of them; the caller is thread 0 */

	pthread_mutex_t mu;
	pthread_cond_t wake, done;
	uint64_t generation; /* bumped for each job */
	unsigned running;    /* workers still on the current job */
	bool stop;
	const da_job *job;
	atomic_uint next_item;

	/* Scratch, grown before a job starts and never inside it. */
	float *thread_scratch; /* n_threads slices of scratch_stride floats */
	size_t scratch_cap, scratch_stride;
	da_item *items;
	size_t items_cap;
	float *partials; /* per-item (o, lse) where a query has several items */
	size_t partials_cap;
	const float **merge_o, **merge_lse;
	size_t merge_o_cap, merge_lse_cap;
};

static void run_items(da_ctx *ctx, const da_job *job, unsigned tid);

static void *worker_main(void *arg)
{
	void **args = arg;
	da_ctx *ctx = args[0];
	unsigned tid = (unsigned)(uintptr_t)args[1];
	free(args);

	uint64_t seen = 0;
	pthread_mutex_lock(&ctx->mu);
	for (;;) {
		while (!ctx->stop && ctx->generation == seen)
			pthread_cond_wait(&ctx->wake, &ctx->mu);
		if (ctx->stop)
			break;
		seen = ctx->generation;
		const da_job *job = ctx->job;
		pthread_mutex_unlock(&ctx->mu);
		run_items(ctx, job, tid);
		pthread_mutex_lock(&ctx->mu);
		if (--ctx->running == 0)
			pthread_cond_signal(&ctx->done);
	}
	pthread_mutex_unlock(&ctx->mu);
	return NULL;
}

static void stop_workers(da_ctx *ctx, unsigned started)
{
	pthread_mutex_lock(&ctx->mu);
	ctx->stop = true;
	pthread_cond_broadcast(&ctx->wake);
	pthread_mutex_unlock(&ctx->mu);
	for (unsigned i = 0; i < started; i++)
		pthread_join(ctx->workers[i], NULL);
}

int da_ctx_create(unsigned n_threads, da_ctx **out)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	if (n_threads == 0) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		n_threads = n > 0 ? (unsigned)n : 1;
	}
	if (n_threads > 1024)
		return -EINVAL;

	da_ctx *ctx = calloc(1, sizeof(*ctx));
	if (!ctx)
		return -ENOMEM;
	ctx->n_threads = n_threads;
	ctx->n_isas = usable_isas(ctx->isas);
	atomic_init(&ctx->next_item, 0);
	int rc = -ENOMEM;
	if (pthread_mutex_init(&ctx->mu, NULL) != 0)
		goto clean_ctx;
	if (pthread_cond_init(&ctx->wake, NULL) != 0)
		goto clean_mu;
	if (pthread_cond_init(&ctx->done, NULL) != 0)
		goto clean_wake;
	ctx->workers = calloc(n_threads, sizeof(pthread_t));
	if (!ctx->workers)
		goto clean_done;

	unsigned started = 0;
	for (; started + 1 < n_threads; started++) {
		void **args = malloc(2 * sizeof(void *));
		if (!args)
			goto clean_threads;
		args[0] = ctx;
		args[1] = (void *)(uintptr_t)(started + 1);
		int err = pthread_create(&ctx->workers[started], NULL, worker_main, args);
		if (err != 0) {
			free(args);
			rc = -err;
			goto clean_threads;
		}
	}
	*out = ctx;
	return 0;

clean_threads:
	stop_workers(ctx, started);
	free(ctx->workers);
clean_done:
	pthread_cond_destroy(&ctx->done);
clean_wake:
	pthread_cond_destroy(&ctx->wake);
clean_mu:
	pthread_mutex_destroy(&ctx->mu);
clean_ctx:
	free(ctx);
	return rc;
}

void da_ctx_destroy(da_ctx *ctx)
{
	if (!ctx)
		return;
	stop_workers(ctx, ctx->n_threads - 1);
	free(ctx->workers);
	pthread_cond_destroy(&ctx->done);
	pthread_cond_destroy(&ctx->wake);
	pthread_mutex_destroy(&ctx->mu);
	free(ctx->thread_scratch);
	free(ctx->items);
	free(ctx->partials);
	free(ctx->merge_o);
	free(ctx->merge_lse);
	free(ctx);
}

unsigned da_ctx_threads(const da_ctx *ctx)
{
	return ctx ? ctx->n_threads : 0;
}

/* Grows *buf to hold n elements of `size` bytes, 64-byte aligned. Existing
 * contents are not kept. */
static int grow(void **buf, size_t *cap, size_t n, size_t size)
{
	if (n <= *cap)
		return 0;
	size_t want = n + n / 2;
	void *p = NULL;
	if (posix_memalign(&p, DA_ALIGN, want * size) != 0)
		return -ENOMEM;
	free(*buf);
	*buf = p;
	*cap = want;
	return 0;
}

/* ---- The driver ------------------------------------------------------------ */

/* Floats of per-thread scratch: scaled q, running max and sum, scores, and
 * the unnormalised output accumulator; each rounded up to 16 floats. */
static size_t scratch_floats(const da_dims *dm)
{
#define R16(x) ((((size_t)(x)) + 15) & ~(size_t)15)
	return R16((size_t)dm->hq * dm->d) * 2 + R16(dm->hq) * 2 + R16((size_t)dm->hq * dm->bt);
#undef R16
}

static void run_item(const da_job *job, const da_item *it, float *scratch)
{
	const da_dims *dm = &job->dims;
	const da_batch *b = job->batch;
	const size_t hd = (size_t)dm->hq * dm->d;
	float *q = scratch;
	float *o = q + ((hd + 15) & ~(size_t)15);
	float *m = o + ((hd + 15) & ~(size_t)15);
	float *l = m + ((dm->hq + 15) & ~15u);
	float *S = l + ((dm->hq + 15) & ~15u);

	const float *qsrc = b->q + (size_t)it->query * hd;
	for (size_t i = 0; i < hd; i++)
		q[i] = qsrc[i] * job->shape->scale;
	memset(o, 0, hd * sizeof(float));
	for (uint32_t h = 0; h < dm->hq; h++) {
		m[h] = -INFINITY;
		l[h] = 0.0f;
	}

	const void *const *blocks = b->blocks + b->block_start[it->query] + it->first;
	for (uint32_t bi = 0; bi < it->count; bi++) {
		const uint8_t *base = blocks[bi];
		uint32_t ntok = bi + 1 == it->count ? it->last_tokens : dm->bt;
		/* The distance to the next block, for prefetching it meanwhile. */
		ptrdiff_t next = bi + 1 < it->count ? (const uint8_t *)blocks[bi + 1] - base : 0;
		job->isa->score(base + job->k_offset, q, dm, ntok, S, next);
		job->isa->softmax_block(S, ntok, dm, m, l, o);
		job->isa->accum(base + job->v_offset, S, dm, ntok, o, next);
	}

	for (uint32_t h = 0; h < dm->hq; h++) {
		float *dst = it->o + (size_t)h * dm->d;
		const float *src = o + (size_t)h * dm->d;
		if (l[h] > 0.0f) {
			float inv = 1.0f / l[h];
			for (uint32_t i = 0; i < dm->d; i++)
				dst[i] = src[i] * inv;
			it->lse[h] = m[h] + logf(l[h]);
		} else {
			memset(dst, 0, dm->d * sizeof(float));
			it->lse[h] = -INFINITY;
		}
	}
}

static void run_items(da_ctx *ctx, const da_job *job, unsigned tid)
{
	float *scratch = ctx->thread_scratch + (size_t)tid * ctx->scratch_stride;
	for (;;) {
		unsigned i = atomic_fetch_add_explicit(&ctx->next_item, 1, memory_order_relaxed);
		if (i >= job->n_items)
			break;
		run_item(job, &job->items[i], scratch);
	}
}

/* Runs the job on every thread of the pool, the caller included. */
static void run_job(da_ctx *ctx, const da_job *job)
{
	atomic_store_explicit(&ctx->next_item, 0, memory_order_relaxed);
	unsigned workers = ctx->n_threads - 1;
	if (workers > 0 && job->n_items > 1) {
		pthread_mutex_lock(&ctx->mu);
		ctx->job = job;
		ctx->running = workers;
		ctx->generation++;
		pthread_cond_broadcast(&ctx->wake);
		pthread_mutex_unlock(&ctx->mu);
		run_items(ctx, job, 0);
		pthread_mutex_lock(&ctx->mu);
		while (ctx->running > 0)
			pthread_cond_wait(&ctx->done, &ctx->mu);
		pthread_mutex_unlock(&ctx->mu);
	} else {
		run_items(ctx, job, 0);
	}
}

static int check_batch(const da_shape *s, const da_batch *b, const float *o, const float *lse)
{
	if (da_shape_check(s) != 0 || !b)
		return -EINVAL;
	if (b->n_queries == 0)
		return 0;
	if (!b->q || !b->block_start || !b->n_tokens || !o || !lse || b->block_start[0] != 0)
		return -EINVAL;
	for (uint32_t i = 0; i < b->n_queries; i++) {
		uint32_t first = b->block_start[i], end = b->block_start[i + 1];
		if (end < first)
			return -EINVAL;
		uint64_t nb = end - first, tok = b->n_tokens[i];
		if (nb == 0 ? tok != 0 : (tok <= (nb - 1) * s->block_tokens || tok > nb * s->block_tokens))
			return -EINVAL;
		if (nb > 0 && !b->blocks)
			return -EINVAL;
		for (uint32_t j = first; j < end; j++)
			if (!b->blocks[j])
				return -EINVAL;
	}
	return 0;
}

int da_partial_cpu(da_ctx *ctx, const da_shape *s, const da_batch *b, float *o, float *lse)
{
	if (!ctx)
		return -EINVAL;
	int rc = check_batch(s, b, o, lse);
	if (rc != 0 || b->n_queries == 0)
		return rc;

	da_job job = {.shape = s, .batch = b};
	job.dims = (da_dims){.hq = s->q_heads,
			     .hkv = s->kv_heads,
			     .group = s->q_heads / s->kv_heads,
			     .d = s->head_dim,
			     .bt = s->block_tokens,
			     .dtype = s->kv_dtype,
			     .v_minus_k = half_layer_bytes(s)};
	job.isa = &da_isa_portable;
	for (int i = ctx->n_isas - 1; i >= 0; i--)
		if (s->head_dim % ctx->isas[i]->lanes == 0)
			job.isa = ctx->isas[i];
	/* MHA (one query head per K/V row) streams faster through the AVX2
	 * loops on AVX-512 machines: measured from memory with make
	 * bench-kernel, 0.79-0.88 of STREAM against 0.66-0.79 for the AVX-512
	 * tiles in the same runs (docs/benchmarks.md). GQA keeps AVX-512. */
	if (job.isa == &da_isa_avx512 && job.dims.group == 1)
		for (int i = 0; i < ctx->n_isas; i++)
			if (ctx->isas[i] == &da_isa_avx2 && s->head_dim % da_isa_avx2.lanes == 0)
				job.isa = &da_isa_avx2;
	job.k_offset = 2 * half_layer_bytes(s) * s->layer;
	job.v_offset = job.k_offset + half_layer_bytes(s);

	/* Cut queries into items of `chunk` blocks: enough items to keep every
	 * thread busy, none so small that its overhead shows. */
	uint64_t total_blocks = b->block_start[b->n_queries];
	uint64_t want_items = (uint64_t)ctx->n_threads * DA_ITEMS_PER_THREAD;
	uint64_t chunk = (total_blocks + want_items - 1) / want_items;
	uint64_t min_chunk = (DA_MIN_ITEM_TOKENS + s->block_tokens - 1) / s->block_tokens;
	if (chunk < min_chunk)
		chunk = min_chunk;

	size_t n_items = 0, n_split_items = 0;
	for (uint32_t i = 0; i < b->n_queries; i++) {
		uint64_t nb = b->block_start[i + 1] - b->block_start[i];
		uint64_t k = nb == 0 ? 1 : (nb + chunk - 1) / chunk;
		n_items += k;
		if (k > 1)
			n_split_items += k;
	}
	const size_t hd = (size_t)s->q_heads * s->head_dim;
	size_t stride = scratch_floats(&job.dims);
	if (grow((void **)&ctx->items, &ctx->items_cap, n_items, sizeof(da_item)) ||
	    grow((void **)&ctx->partials, &ctx->partials_cap, n_split_items * (hd + s->q_heads),
		 sizeof(float)) ||
	    grow((void **)&ctx->thread_scratch, &ctx->scratch_cap, stride * ctx->n_threads,
		 sizeof(float)) ||
	    grow((void **)&ctx->merge_o, &ctx->merge_o_cap, n_items, sizeof(float *)) ||
	    grow((void **)&ctx->merge_lse, &ctx->merge_lse_cap, n_items, sizeof(float *)))
		return -ENOMEM;
	ctx->scratch_stride = stride;

	size_t k = 0;
	float *part = ctx->partials;
	for (uint32_t i = 0; i < b->n_queries; i++) {
		uint32_t nb = b->block_start[i + 1] - b->block_start[i];
		uint32_t pieces = nb == 0 ? 1 : (uint32_t)((nb + chunk - 1) / chunk);
		for (uint32_t p = 0; p < pieces; p++) {
			da_item *it = &ctx->items[k++];
			it->query = i;
			it->first = (uint32_t)(p * chunk);
			it->count = nb == 0 ? 0 : (uint32_t)(p + 1 == pieces ? nb - p * chunk : chunk);
			/* Only the query's last item ends in its (maybe partial) tail block. */
			it->last_tokens = p + 1 < pieces ? s->block_tokens
							 : b->n_tokens[i] - (nb - 1) * s->block_tokens;
			if (pieces == 1) {
				it->o = o + (size_t)i * hd;
				it->lse = lse + (size_t)i * s->q_heads;
			} else {
				it->o = part;
				it->lse = part + hd;
				part += hd + s->q_heads;
			}
		}
	}
	job.items = ctx->items;
	job.n_items = (uint32_t)n_items;
	run_job(ctx, &job);

	/* Merge split queries in item order: deterministic for this context. */
	for (size_t j = 0; j < n_items;) {
		const da_item *it = &ctx->items[j];
		size_t end = j + 1;
		while (end < n_items && ctx->items[end].query == it->query)
			end++;
		if (end - j > 1) {
			for (size_t p = j; p < end; p++) {
				ctx->merge_o[p - j] = ctx->items[p].o;
				ctx->merge_lse[p - j] = ctx->items[p].lse;
			}
			da_merge_cpu((uint32_t)(end - j), s->q_heads, s->head_dim, ctx->merge_o,
				     ctx->merge_lse, o + (size_t)it->query * hd,
				     lse + (size_t)it->query * s->q_heads);
		}
		j = end;
	}
	return 0;
}

/* ---- Merge ----------------------------------------------------------------- */

int da_merge_cpu(uint32_t n_parts, uint32_t rows, uint32_t head_dim, const float *const *o_parts,
		 const float *const *lse_parts, float *o_out, float *lse_out)
{
	if (head_dim == 0 || !o_out || !lse_out || (n_parts > 0 && (!o_parts || !lse_parts)))
		return -EINVAL;
	for (uint32_t j = 0; j < n_parts; j++)
		if (!o_parts[j] || !lse_parts[j])
			return -EINVAL;

	for (uint32_t r = 0; r < rows; r++) {
		float M = -INFINITY;
		for (uint32_t j = 0; j < n_parts; j++)
			if (lse_parts[j][r] > M)
				M = lse_parts[j][r];
		float *dst = o_out + (size_t)r * head_dim;
		if (M == -INFINITY) { /* every part empty: the result is empty */
			memset(dst, 0, head_dim * sizeof(float));
			lse_out[r] = -INFINITY;
			continue;
		}
		/* Part 0 first, since o_out may be o_parts[0]: it is read before
		 * it is overwritten, and later parts never alias o_out. */
		float w0 = expf(lse_parts[0][r] - M), W = w0;
		const float *src0 = o_parts[0] + (size_t)r * head_dim;
		for (uint32_t i = 0; i < head_dim; i++)
			dst[i] = w0 * src0[i];
		for (uint32_t j = 1; j < n_parts; j++) {
			float w = expf(lse_parts[j][r] - M);
			if (w == 0.0f)
				continue;
			W += w;
			const float *src = o_parts[j] + (size_t)r * head_dim;
			for (uint32_t i = 0; i < head_dim; i++)
				dst[i] += w * src[i];
		}
		float inv = 1.0f / W;
		for (uint32_t i = 0; i < head_dim; i++)
			dst[i] *= inv;
		lse_out[r] = M + logf(W);
	}
	return 0;
}
