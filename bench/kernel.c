/* make bench-kernel: how close the CPU DistAttention kernel comes to this
 * machine's memory read bandwidth, measured in the same run.
 *
 * 1. A STREAM-like read (sum of a 1 GiB buffer, far larger than any cache),
 *    on one thread and on all threads: the physical limit.
 * 2. One decode query over 32K tokens of fp16 KV, head_dim 128, Hq = 32, for
 *    MHA (Hkv 32) and GQA (Hkv 8 and 4), on one thread and all threads. The
 *    KV is spread over enough copies (>= 1 GiB in all) that every query reads
 *    it from memory, and its blocks sit in shuffled arena slots as a store
 *    would place them. Effective bandwidth = KV bytes read / time.
 *
 * 3. The FMA peak of one core (independent fused multiply-adds in registers,
 *    widest vectors the CPU has): the compute limit. Decode attention does
 *    one fp32 multiply-add per KV element per query head of its group, so
 *    the compute-bound ceiling in KV bytes/s is peak_lanes * 2 / group for
 *    fp16; for GQA it falls below memory bandwidth.
 *
 * The machine is shared: rounds measure STREAM and every kernel case back to
 * back, ratios are taken per round, and medians over rounds are reported.
 *
 * Final lines: name=value, ratios kernel/STREAM with all threads as
 * kernel_bw_ratio_{mha,gqa8,gqa4}, with one thread as ..._1t. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels/distattn.h"

#define GIB (1024.0 * 1024.0 * 1024.0)
#define TOKENS 32768u
#define HEAD_DIM 128u
#define Q_HEADS 32u
#define BLOCK_TOKENS 16u
#define REPS 3 /* passes of one STREAM measurement; the median is taken */

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof(double), cmp_double);
	return v[n / 2];
}

/* ---- STREAM-like read -------------------------------------------------------- */

typedef struct {
	const uint64_t *p;
	size_t n;
	uint64_t sum;
} read_arg;

static void *read_part(void *arg)
{
	read_arg *a = arg;
	/* Four independent sums so the loop is bound by loads, not by adds. */
	uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
	for (size_t i = 0; i + 4 <= a->n; i += 4) {
		s0 += a->p[i];
		s1 += a->p[i + 1];
		s2 += a->p[i + 2];
		s3 += a->p[i + 3];
	}
	a->sum = s0 + s1 + s2 + s3;
	return NULL;
}

/* GB/s of reading buf (n words) with `threads` threads; median of REPS. */
static double stream_read(const uint64_t *buf, size_t n, unsigned threads)
{
	double t[REPS];
	pthread_t tid[64];
	read_arg args[64];
	uint64_t sink = 0;
	for (int r = 0; r < REPS; r++) {
		double t0 = now();
		for (unsigned i = 0; i < threads; i++) {
			args[i] = (read_arg){.p = buf + n / threads * i, .n = n / threads};
			if (i > 0)
				pthread_create(&tid[i], NULL, read_part, &args[i]);
		}
		read_part(&args[0]);
		for (unsigned i = 1; i < threads; i++)
			pthread_join(tid[i], NULL);
		t[r] = now() - t0;
		for (unsigned i = 0; i < threads; i++)
			sink += args[i].sum;
	}
	if (sink == 42)
		fprintf(stderr, "(unlikely checksum)\n");
	return n * 8.0 / median(t, REPS) / 1e9;
}

/* ---- FMA peak ------------------------------------------------------------- */

#define FMA_ITERS 120000000L

#if defined(__x86_64__)
#include <immintrin.h>
/* Twelve independent chains (more than FMA latency x ports), each kept in a
 * register by the empty asm, so the loop is nothing but FMAs. */
#define FMA_BODY(FMA)                                                                              \
	for (long n = 0; n < FMA_ITERS / 12; n++) {                                                \
		a0 = FMA(a0, x, y), a1 = FMA(a1, x, y), a2 = FMA(a2, x, y), a3 = FMA(a3, x, y);    \
		a4 = FMA(a4, x, y), a5 = FMA(a5, x, y), a6 = FMA(a6, x, y), a7 = FMA(a7, x, y);    \
		a8 = FMA(a8, x, y), a9 = FMA(a9, x, y), a10 = FMA(a10, x, y), a11 = FMA(a11, x, y); \
		__asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), \
				 "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));    \
	}

__attribute__((target("avx512f"))) static double fma_avx512(void)
{
	__m512 x = _mm512_set1_ps(0.9999f), y = _mm512_set1_ps(1e-4f);
	__m512 a0 = y, a1 = y, a2 = y, a3 = y, a4 = y, a5 = y, a6 = y, a7 = y, a8 = y, a9 = y,
	       a10 = y, a11 = y;
	double t0 = now();
	FMA_BODY(_mm512_fmadd_ps)
	double dt = now() - t0;
	__m512 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
	if (_mm512_reduce_add_ps(s) == 42.0f)
		fprintf(stderr, "(unlikely)\n");
	return (double)(FMA_ITERS / 12) * 12 * 16 / dt / 1e9;
}

__attribute__((target("avx2,fma"))) static double fma_avx2(void)
{
	__m256 x = _mm256_set1_ps(0.9999f), y = _mm256_set1_ps(1e-4f);
	__m256 a0 = y, a1 = y, a2 = y, a3 = y, a4 = y, a5 = y, a6 = y, a7 = y, a8 = y, a9 = y,
	       a10 = y, a11 = y;
	double t0 = now();
	FMA_BODY(_mm256_fmadd_ps)
	double dt = now() - t0;
	__m256 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
	float v[8];
	_mm256_storeu_ps(v, s);
	if (v[0] + v[7] == 42.0f)
		fprintf(stderr, "(unlikely)\n");
	return (double)(FMA_ITERS / 12) * 12 * 8 / dt / 1e9;
}
#endif

/* fp32 multiply-adds per nanosecond on one core (lanes, not instructions),
 * with the vectors the kernels use here; best of three runs. */
static double fma_peak(void)
{
	double best = 0;
	for (int r = 0; r < 3; r++) {
		double g = 0;
#if defined(__x86_64__)
		if (strcmp(da_cpu_isa(), "avx512") == 0)
			g = fma_avx512();
		else if (strcmp(da_cpu_isa(), "avx2+f16c") == 0)
			g = fma_avx2();
#endif
		if (g > best)
			best = g;
	}
	return best;
}

/* ---- The kernel ------------------------------------------------------------- */

typedef struct {
	const char *name;
	uint32_t kv_heads;
	/* Prepared once: the arena of copies, its shuffled block list, buffers. */
	da_shape shape;
	uint8_t *arena;
	const void **blocks;
	uint32_t nb, copies;
	size_t kv_bytes; /* one query's KV: one layer's K and V of every block */
	float *q, *o, lse[Q_HEADS];
} config;

/* Allocates and fills a config's arena: enough copies of the sequence that
 * the working set is >= 1 GiB, blocks in shuffled slots as an arena hands
 * them out, on transparent huge pages as a kvstore arena is. */
static void prepare(config *c)
{
	c->shape = (da_shape){.q_heads = Q_HEADS,
			      .kv_heads = c->kv_heads,
			      .head_dim = HEAD_DIM,
			      .block_tokens = BLOCK_TOKENS,
			      .layer = 0,
			      .kv_dtype = DA_F16,
			      .scale = 1.0f / sqrtf((float)HEAD_DIM)};
	size_t block_bytes = da_block_bytes(&c->shape, 1);
	c->nb = TOKENS / BLOCK_TOKENS;
	c->kv_bytes = block_bytes * c->nb;
	c->copies = (uint32_t)ceil(GIB / c->kv_bytes);
	if (c->copies < 2)
		c->copies = 2;
	size_t slots = (size_t)c->nb * c->copies;
	c->arena = aligned_alloc(2 * 1024 * 1024, slots * block_bytes);
	if (!c->arena) {
		fprintf(stderr, "bench: cannot allocate %.1f GiB\n", slots * block_bytes / GIB);
		exit(1);
	}
	madvise(c->arena, slots * block_bytes, MADV_HUGEPAGE);
	/* Small fp16 values (0x3c00 is 1.0; vary the low bits). */
	for (size_t i = 0; i < slots * block_bytes / 2; i++)
		((uint16_t *)c->arena)[i] = (uint16_t)(0x3800 + (i * 2654435761u >> 22) % 1024);
	uint32_t *perm = malloc(slots * sizeof(uint32_t));
	for (size_t i = 0; i < slots; i++)
		perm[i] = (uint32_t)i;
	uint64_t rng = 88172645463325252ull;
	for (size_t i = slots - 1; i > 0; i--) {
		rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
		size_t j = rng % (i + 1);
		uint32_t t = perm[i];
		perm[i] = perm[j], perm[j] = t;
	}
	c->blocks = malloc(slots * sizeof(void *));
	for (size_t i = 0; i < slots; i++)
		c->blocks[i] = c->arena + (size_t)perm[i] * block_bytes;
	free(perm);
	c->q = malloc(Q_HEADS * HEAD_DIM * sizeof(float));
	c->o = malloc(Q_HEADS * HEAD_DIM * sizeof(float));
	for (uint32_t i = 0; i < Q_HEADS * HEAD_DIM; i++)
		c->q[i] = (float)((i * 37) % 17) / 17.0f - 0.5f;
}

/* GB/s of KV read by da_partial_cpu: one query over each copy in turn (so
 * every query reads from memory), median time of those queries. */
static double kernel_read(config *c, da_ctx *ctx)
{
	uint32_t start[2] = {0, c->nb}, ntok = TOKENS;
	double t[64];
	uint32_t n = c->copies < 64 ? c->copies : 64;
	for (uint32_t k = 0; k < n; k++) {
		da_batch b = {1, c->q, c->blocks + (size_t)k * c->nb, start, &ntok, c->nb};
		double t0 = now();
		int rc = da_partial_cpu(ctx, &c->shape, &b, c->o, c->lse);
		t[k] = now() - t0;
		if (rc != 0) {
			fprintf(stderr, "bench: da_partial_cpu: %d\n", rc);
			exit(1);
		}
	}
	return c->kv_bytes / median(t, (int)n) / 1e9;
}

#define ROUNDS 9

int main(void)
{
	unsigned all = (unsigned)sysconf(_SC_NPROCESSORS_ONLN);
	if (all < 1)
		all = 1;
	if (all > 64)
		all = 64;
	printf("bench-kernel: cpu isa=%s threads=%u, fp16 KV, %u tokens, head_dim %u, Hq %u, "
	       "block_tokens %u; %d rounds, each measuring STREAM and every kernel case back "
	       "to back; medians over rounds\n",
	       da_cpu_isa(), all, TOKENS, HEAD_DIM, Q_HEADS, BLOCK_TOKENS, ROUNDS);

	size_t words = (size_t)(GIB / 8);
	uint64_t *buf = aligned_alloc(2 * 1024 * 1024, words * 8);
	if (!buf) {
		fprintf(stderr, "bench: cannot allocate 1 GiB\n");
		return 1;
	}
	madvise(buf, words * 8, MADV_HUGEPAGE);
	for (size_t i = 0; i < words; i++)
		buf[i] = i;

	double fma = fma_peak();
	static config cfgs[] = {{.name = "mha", .kv_heads = 32},
				{.name = "gqa8", .kv_heads = 8},
				{.name = "gqa4", .kv_heads = 4}};
	da_ctx *one, *many;
	if (da_ctx_create(1, &one) != 0 || da_ctx_create(all, &many) != 0) {
		fprintf(stderr, "bench: da_ctx_create failed\n");
		return 1;
	}
	for (int c = 0; c < 3; c++) {
		prepare(&cfgs[c]);
		kernel_read(&cfgs[c], one); /* warm-up: page faults, scratch growth */
		kernel_read(&cfgs[c], many);
	}

	/* Rounds: the machine is shared and its load drifts, so each round
	 * measures the limit and the kernel within a second of each other and
	 * the ratios are taken per round. */
	double s1[ROUNDS], sN[ROUNDS], b1[3][ROUNDS], bN[3][ROUNDS], r1[3][ROUNDS], rN[3][ROUNDS];
	for (int r = 0; r < ROUNDS; r++) {
		s1[r] = stream_read(buf, words, 1);
		sN[r] = stream_read(buf, words, all);
		for (int c = 0; c < 3; c++) {
			b1[c][r] = kernel_read(&cfgs[c], one);
			bN[c][r] = kernel_read(&cfgs[c], many);
			r1[c][r] = b1[c][r] / s1[r];
			rN[c][r] = bN[c][r] / sN[r];
		}
		fprintf(stderr, "round %d/%d: stream %.1f/%.1f GB/s, mha %.1f/%.1f\n", r + 1, ROUNDS,
			s1[r], sN[r], b1[0][r], bN[0][r]);
	}
	double stream1 = median(s1, ROUNDS), streamN = median(sN, ROUNDS);
	printf("  STREAM-like read of 1 GiB: %.2f GB/s (1 thread), %.2f GB/s (%u threads)\n",
	       stream1, streamN, all);
	printf("  FMA peak of one core: %.1f fp32 multiply-adds/ns\n", fma);
	double bw1[3], bwN[3], ratio1[3], ratioN[3];
	for (int c = 0; c < 3; c++) {
		bw1[c] = median(b1[c], ROUNDS);
		bwN[c] = median(bN[c], ROUNDS);
		ratio1[c] = median(r1[c], ROUNDS);
		ratioN[c] = median(rN[c], ROUNDS);
		/* fp16: 2 bytes per element, Q_HEADS / kv_heads multiply-adds each. */
		double compute1 = fma * 2.0 / ((double)Q_HEADS / cfgs[c].kv_heads);
		printf("  %-4s (Hkv %2u, %.3f GB of KV a query): %.2f GB/s (1 thread, %.2f of STREAM), "
		       "%.2f GB/s (%u threads, %.2f of STREAM); compute ceiling %.1f GB/s a core\n",
		       cfgs[c].name, cfgs[c].kv_heads, cfgs[c].kv_bytes / 1e9, bw1[c], ratio1[c],
		       bwN[c], all, ratioN[c], compute1);
	}

	printf("fma_peak_per_ns_1t=%.1f\n", fma);
	printf("stream_read_gbs_1t=%.2f\n", stream1);
	printf("stream_read_gbs=%.2f\n", streamN);
	for (int c = 0; c < 3; c++) {
		printf("kernel_bw_gbs_%s_1t=%.2f\n", cfgs[c].name, bw1[c]);
		printf("kernel_bw_gbs_%s=%.2f\n", cfgs[c].name, bwN[c]);
	}
	for (int c = 0; c < 3; c++)
		printf("kernel_bw_ratio_%s_1t=%.2f\n", cfgs[c].name, ratio1[c]);
	for (int c = 0; c < 3; c++)
		printf("kernel_bw_ratio_%s=%.2f\n", cfgs[c].name, ratioN[c]);
	da_ctx_destroy(one);
	da_ctx_destroy(many);
	return 0;
}
