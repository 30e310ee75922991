/* GPU DistAttention bandwidth benchmark.
 *
 * Measures in one run (1) the device's plain read bandwidth, a streaming read
 * of a 4 GiB buffer, and (2) the effective KV read bandwidth of
 * da_partial_cuda (KV bytes the call must read / time per call, calls issued
 * back to back) for decode queries over 32K tokens, fp16, head_dim 128,
 * block_tokens 16: one query for MHA (32/32) and GQA (32/8, 32/4), and a
 * batch of 64 queries (MHA and 32/8). Small working sets rotate over several
 * copies so that L2 (60 MB on an H200) does not serve repeated calls. Final
 * lines: gpu_kernel_bw_ratio_NAME=kernel/read.
 *
 *   gpu_kernel */
#include "kernels/distattn.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(call)                                                                              \
	do {                                                                                  \
		cudaError_t e_ = (call);                                                      \
		if (e_ != cudaSuccess) {                                                      \
			fprintf(stderr, "level=error bench=gpu_kernel op=%s cuda_error=\"%s\"\n", \
				#call, cudaGetErrorString(e_));                               \
			return -EIO;                                                          \
		}                                                                             \
	} while (0)

/* Four independent 16-byte loads per thread and step keep enough bytes in
 * flight; the xor feeds a store that never happens, so no load is dropped. */
__global__ void read_kernel(const uint4 *__restrict__ p, size_t n, unsigned *sink)
{
	const size_t stride = (size_t)gridDim.x * blockDim.x;
	unsigned acc = 0;
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	for (; i + 3 * stride < n; i += 4 * stride) {
		const uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride);
		const uint4 c = __ldcs(p + i + 2 * stride), d = __ldcs(p + i + 3 * stride);
		acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
		acc ^= c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
	}
	for (; i < n; i += stride) {
		const uint4 a = __ldcs(p + i);
		acc ^= a.x ^ a.y ^ a.z ^ a.w;
	}
	if (acc == 0x9e3779b9u)
		*sink = acc;
}

/* Pseudo-random fp16 values in [-1, 1). */
__global__ void fill_f16(uint16_t *p, size_t n, uint32_t seed)
{
	for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
	     i += (size_t)gridDim.x * blockDim.x) {
		uint32_t h = (uint32_t)i * 0x9e3779b1u ^ seed;
		h ^= h >> 15;
		h *= 0x85ebca6bu;
		h ^= h >> 13;
		const float v = (float)(h & 0xffffu) / 32768.0f - 1.0f;
		p[i] = __half_as_ushort(__float2half(v));
	}
}

static int n_sm;

/* Best-of-trials read bandwidth in GB/s over a `bytes` buffer. */
static int read_bw(size_t bytes, double *gbs)
{
	uint4 *buf = NULL;
	unsigned *sink = NULL;
	CK(cudaMalloc(&buf, bytes));
	CK(cudaMalloc(&sink, sizeof(unsigned)));
	CK(cudaMemset(buf, 1, bytes));
	cudaEvent_t a, b;
	CK(cudaEventCreate(&a));
	CK(cudaEventCreate(&b));
	const size_t n = bytes / sizeof(uint4);
	const int grid = n_sm * 8, reps = 10;
	double best = 0.0;
	read_kernel<<<grid, 256>>>(buf, n, sink); /* warm-up */
	CK(cudaGetLastError());
	for (int t = 0; t < 3; t++) {
		CK(cudaEventRecord(a));
		for (int r = 0; r < reps; r++)
			read_kernel<<<grid, 256>>>(buf, n, sink);
		CK(cudaEventRecord(b));
		CK(cudaEventSynchronize(b));
		float ms = 0.0f;
		CK(cudaEventElapsedTime(&ms, a, b));
		const double g = (double)bytes * reps / (ms * 1e-3) / 1e9;
		if (g > best)
			best = g;
	}
	CK(cudaGetLastError());
	cudaEventDestroy(a);
	cudaEventDestroy(b);
	cudaFree(buf);
	cudaFree(sink);
	*gbs = best;
	return 0;
}

struct kv_set {
	unsigned char *kv;  /* n_queries * blocks_per_query blocks */
	const void **ptrs;  /* device array of block addresses */
};

/* Effective KV bandwidth of da_partial_cuda for n_queries queries of `tokens`
 * tokens each; also the time per call. */
static int kernel_bw(da_cuda_ctx *ctx, uint32_t hq, uint32_t hkv, uint32_t nq, uint32_t tokens,
		     double *gbs, double *us)
{
	const uint32_t d = 128, bt = 16;
	da_shape s = {};
	s.q_heads = hq;
	s.kv_heads = hkv;
	s.head_dim = d;
	s.block_tokens = bt;
	s.layer = 0;
	s.kv_dtype = DA_F16;
	s.scale = 1.0f / sqrtf((float)d);
	const uint32_t nbq = (tokens + bt - 1) / bt;
	const size_t blk = da_block_bytes(&s, 1);
	const size_t set_bytes = (size_t)nq * nbq * blk;
	const double kv_bytes = (double)nq * tokens * hkv * d * 2 /* k and v */ * 2 /* fp16 */;
	/* At least 2 GiB across the copies, so L2 never holds the next call's KV. */
	int copies = (int)((2ull << 30) / set_bytes) + 1;
	if (copies > 32)
		copies = 32;

	kv_set sets[32] = {};
	float *q = NULL, *o = NULL, *lse = NULL;
	uint32_t *start = NULL, *ntok = NULL;
	int rc = 0;
	uint32_t *hstart = (uint32_t *)malloc((nq + 1) * sizeof(uint32_t));
	uint32_t *hntok = (uint32_t *)malloc(nq * sizeof(uint32_t));
	const void **hptr = (const void **)malloc((size_t)nq * nbq * sizeof(void *));
	float *hq_buf = (float *)malloc((size_t)nq * hq * d * sizeof(float));
	float *hlse = (float *)malloc((size_t)nq * hq * sizeof(float));
	if (!hstart || !hntok || !hptr || !hq_buf || !hlse) {
		rc = -ENOMEM;
		goto out;
	}
	for (uint32_t i = 0; i <= nq; i++)
		hstart[i] = i * nbq;
	for (uint32_t i = 0; i < nq; i++)
		hntok[i] = tokens;
	for (size_t i = 0; i < (size_t)nq * hq * d; i++)
		hq_buf[i] = (float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f;

#define CKO(call)                                                                             \
	do {                                                                                  \
		cudaError_t e_ = (call);                                                      \
		if (e_ != cudaSuccess) {                                                      \
			fprintf(stderr, "level=error bench=gpu_kernel op=%s cuda_error=\"%s\"\n", \
				#call, cudaGetErrorString(e_));                               \
			rc = -EIO;                                                            \
			goto out;                                                             \
		}                                                                             \
	} while (0)

	for (int c = 0; c < copies; c++) {
		CKO(cudaMalloc(&sets[c].kv, set_bytes));
		CKO(cudaMalloc(&sets[c].ptrs, (size_t)nq * nbq * sizeof(void *)));
		fill_f16<<<n_sm * 8, 256>>>((uint16_t *)sets[c].kv, set_bytes / 2, 0x1234u + c);
		CKO(cudaGetLastError());
		for (size_t j = 0; j < (size_t)nq * nbq; j++)
			hptr[j] = sets[c].kv + j * blk;
		CKO(cudaMemcpy(sets[c].ptrs, hptr, (size_t)nq * nbq * sizeof(void *),
			       cudaMemcpyHostToDevice));
	}
	CKO(cudaMalloc(&q, (size_t)nq * hq * d * sizeof(float)));
	CKO(cudaMalloc(&o, (size_t)nq * hq * d * sizeof(float)));
	CKO(cudaMalloc(&lse, (size_t)nq * hq * sizeof(float)));
	CKO(cudaMalloc(&start, (nq + 1) * sizeof(uint32_t)));
	CKO(cudaMalloc(&ntok, nq * sizeof(uint32_t)));
	CKO(cudaMemcpy(q, hq_buf, (size_t)nq * hq * d * sizeof(float), cudaMemcpyHostToDevice));
	CKO(cudaMemcpy(start, hstart, (nq + 1) * sizeof(uint32_t), cudaMemcpyHostToDevice));
	CKO(cudaMemcpy(ntok, hntok, nq * sizeof(uint32_t), cudaMemcpyHostToDevice));
	CKO(cudaDeviceSynchronize());

	{
		da_batch b = {};
		b.n_queries = nq;
		b.q = q;
		b.block_start = start;
		b.n_tokens = ntok;
		b.max_blocks = nbq;
		/* Warm-up: grows the workspace and loads the kernels. */
		for (int c = 0; c < copies; c++) {
			b.blocks = sets[c].ptrs;
			if ((rc = da_partial_cuda(ctx, &s, &b, o, lse, NULL)) != 0)
				goto out;
		}
		CKO(cudaDeviceSynchronize());

		cudaEvent_t ea, eb;
		CKO(cudaEventCreate(&ea));
		CKO(cudaEventCreate(&eb));
		/* About 50 ms of KV reads at 4 TB/s a trial, 20 to 2000 calls. */
		int reps = (int)(4e12 / kv_bytes * 0.05);
		reps = reps < 20 ? 20 : reps > 2000 ? 2000 : reps;
		double best = INFINITY;
		for (int t = 0; t < 3; t++) {
			CKO(cudaEventRecord(ea));
			for (int r = 0; r < reps; r++) {
				b.blocks = sets[r % copies].ptrs;
				if ((rc = da_partial_cuda(ctx, &s, &b, o, lse, NULL)) != 0)
					goto out;
			}
			CKO(cudaEventRecord(eb));
			CKO(cudaEventSynchronize(eb));
			float ms = 0.0f;
			CKO(cudaEventElapsedTime(&ms, ea, eb));
			if (ms / reps < best)
				best = ms / reps;
		}
		cudaEventDestroy(ea);
		cudaEventDestroy(eb);
		*us = best * 1e3;
		*gbs = kv_bytes / (best * 1e-3) / 1e9;

		/* A sanity look at the output: every lse finite. */
		CKO(cudaMemcpy(hlse, lse, (size_t)nq * hq * sizeof(float), cudaMemcpyDeviceToHost));
		for (size_t i = 0; i < (size_t)nq * hq; i++)
			if (!isfinite(hlse[i])) {
				fprintf(stderr, "level=error bench=gpu_kernel msg=\"non-finite lse\" row=%zu\n", i);
				rc = -EIO;
				goto out;
			}
	}
out:
	for (int c = 0; c < copies; c++) {
		cudaFree(sets[c].kv);
		cudaFree(sets[c].ptrs);
	}
	cudaFree(q);
	cudaFree(o);
	cudaFree(lse);
	cudaFree(start);
	cudaFree(ntok);
	free(hstart);
	free(hntok);
	free(hptr);
	free(hq_buf);
	free(hlse);
	return rc;
}

int main(int argc, char **argv)
{
	if (argc > 1) {
		fprintf(stderr, "usage: %s\n", argv[0]);
		return 2;
	}
	int n_dev = 0;
	cudaError_t e = cudaGetDeviceCount(&n_dev);
	if (e != cudaSuccess || n_dev == 0) {
		fprintf(stderr,
			"level=error bench=gpu_kernel msg=\"no CUDA device present\" cuda_error=\"%s\"\n",
			e != cudaSuccess ? cudaGetErrorString(e) : "device count is 0");
		return 2;
	}
	cudaDeviceProp prop;
	if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess)
		return 1;
	n_sm = prop.multiProcessorCount;
	printf("device=\"%s\" sm=%d.%d multiprocessors=%d l2_mb=%d mem_gb=%.0f\n", prop.name,
	       prop.major, prop.minor, n_sm, prop.l2CacheSize >> 20, prop.totalGlobalMem / 1e9);
	double read = 0.0;
	int rc = read_bw(4ull << 30, &read);
	if (rc != 0)
		return 1;
	printf("gpu_read_bw_gbs=%.0f\n", read);

	da_cuda_ctx *ctx = NULL;
	if ((rc = da_cuda_ctx_create(&ctx)) != 0) {
		fprintf(stderr, "level=error bench=gpu_kernel op=da_cuda_ctx_create rc=%d\n", rc);
		return 1;
	}
	struct {
		const char *name;
		uint32_t hq, hkv, nq;
	} runs[] = {
		{"mha", 32, 32, 1},	   {"gqa8", 32, 8, 1},	     {"gqa4", 32, 4, 1},
		{"batch64_mha", 32, 32, 64}, {"batch64_gqa8", 32, 8, 64},
	};
	const size_t nr = sizeof(runs) / sizeof(runs[0]);
	double ratio[8];
	for (size_t i = 0; i < nr; i++) {
		double gbs = 0.0, us = 0.0;
		rc = kernel_bw(ctx, runs[i].hq, runs[i].hkv, runs[i].nq, 32768, &gbs, &us);
		if (rc != 0) {
			fprintf(stderr, "level=error bench=gpu_kernel run=%s rc=%d\n", runs[i].name, rc);
			da_cuda_ctx_destroy(ctx);
			return 1;
		}
		ratio[i] = gbs / read;
		printf("gpu_kernel_bw_gbs_%s=%.0f time_us=%.1f queries=%u tokens=32768 hq=%u hkv=%u "
		       "head_dim=128 dtype=f16 block_tokens=16\n",
		       runs[i].name, gbs, us, runs[i].nq, runs[i].hq, runs[i].hkv);
		fflush(stdout);
	}
	da_cuda_ctx_destroy(ctx);
	printf("gpu_read_bw_gbs=%.0f\n", read);
	for (size_t i = 0; i < nr; i++)
		printf("gpu_kernel_bw_ratio_%s=%.2f\n", runs[i].name, ratio[i]);
	return 0;
}
