/* Concurrency check of the kernel thread pool, as a plain program (Criterion
 * cannot run under ThreadSanitizer: Snaipe/Criterion#274), so that
 * `make SAN=thread test` exercises it. Several application threads each drive
 * their own multi-threaded context over shared, read-only KV blocks; every
 * result must equal a one-thread context's bit for bit modulo the split
 * (compared within 1e-5). Prints "N passed, N failed". */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/distattn.h"

enum { APP_THREADS = 3, CALLS = 20, NQ = 3, HKV = 2, GROUP = 4, D = 64, BT = 16, NB = 90 };

static const da_shape shape = {.q_heads = HKV * GROUP,
			       .kv_heads = HKV,
			       .head_dim = D,
			       .block_tokens = BT,
			       .layer = 0,
			       .kv_dtype = DA_F32,
			       .scale = 0.125f};
static float q[NQ * HKV * GROUP * D];
static const void *blocks[NQ * NB];
static uint32_t start[NQ + 1], ntok[NQ];
static float want_o[NQ * HKV * GROUP * D], want_lse[NQ * HKV * GROUP];

static int run_batch(da_ctx *ctx, float *o, float *lse)
{
	da_batch b = {NQ, q, blocks, start, ntok, NB};
	return da_partial_cpu(ctx, &shape, &b, o, lse);
}

static void *app_thread(void *arg)
{
	int *failures = arg;
	da_ctx *ctx;
	if (da_ctx_create(3, &ctx) != 0) {
		(*failures)++;
		return NULL;
	}
	float o[sizeof(want_o) / sizeof(float)], lse[sizeof(want_lse) / sizeof(float)];
	for (int c = 0; c < CALLS; c++) {
		if (run_batch(ctx, o, lse) != 0) {
			(*failures)++;
			continue;
		}
		for (size_t i = 0; i < sizeof(o) / sizeof(float); i++)
			if (fabsf(o[i] - want_o[i]) > 1e-5f) {
				(*failures)++;
				break;
			}
	}
	da_ctx_destroy(ctx);
	return NULL;
}

int main(void)
{
	size_t block_floats = da_block_bytes(&shape, 1) / sizeof(float);
	float *arena = malloc(NQ * NB * block_floats * sizeof(float));
	uint32_t seed = 1;
	for (size_t i = 0; i < NQ * NB * block_floats; i++) {
		seed = seed * 1664525u + 1013904223u;
		arena[i] = (float)(seed >> 8) / (1u << 24) - 0.5f;
	}
	for (size_t i = 0; i < sizeof(q) / sizeof(float); i++)
		q[i] = (float)((i * 7) % 13) / 13.0f - 0.5f;
	for (int i = 0; i < NQ; i++) {
		start[i + 1] = start[i] + NB;
		ntok[i] = NB * BT - i * 5; /* different tail fills */
	}
	for (int i = 0; i < NQ * NB; i++)
		blocks[i] = arena + (size_t)i * block_floats;

	int passed = 0, failed = 0;
	da_ctx *one;
	if (da_ctx_create(1, &one) != 0 || run_batch(one, want_o, want_lse) != 0) {
		printf("stress_distattn: reference run failed\n0 passed, 1 failed\n");
		return 1;
	}
	da_ctx_destroy(one);

	pthread_t th[APP_THREADS];
	int fails[APP_THREADS] = {0};
	for (int i = 0; i < APP_THREADS; i++)
		pthread_create(&th[i], NULL, app_thread, &fails[i]);
	for (int i = 0; i < APP_THREADS; i++) {
		pthread_join(th[i], NULL);
		if (fails[i] == 0)
			passed++;
		else
			failed++, printf("app thread %d: %d bad results\n", i, fails[i]);
	}
	free(arena);
	printf("%d passed, %d failed\n", passed, failed);
	return failed != 0;
}
