/* Internal to kernels/: the per-instruction-set inner loops of the CPU path.
 * distattn.c drives them (work items, online softmax bookkeeping, threads);
 * each ISA file fills one table. Not a public header. */
#ifndef KVMESH_KERNELS_DISTATTN_IMPL_H
#define KVMESH_KERNELS_DISTATTN_IMPL_H

#include <stddef.h>

#include "kernels/distattn.h"

/* Dimensions of one call, derived once from da_shape. */
typedef struct da_dims {
	uint32_t hq, hkv, group, d, bt; /* group = hq / hkv */
	da_dtype dtype;
	size_t v_minus_k; /* bytes from a layer's K to its V in a block */
} da_dims;

typedef struct da_isa {
	const char *name;
	uint32_t lanes; /* head_dim must be a multiple of this (1: any) */
	/* The scores q[h] . K[t][h / group] for t < ntok and every query head h,
	 * into S (hq * bt floats, laid out as this ISA's three functions agree:
	 * the portable ones head-major, the SIMD ones token-major). K is one
	 * layer's K of one block ([token][kv_head][d]), q holds hq rows of d
	 * floats, already multiplied by the softmax scale.
	 * `next` (bytes from K to the next block's K, or 0) says what to
	 * prefetch while computing. */
	void (*score)(const void *K, const float *q, const da_dims *dm, uint32_t ntok, float *S,
		      ptrdiff_t next);
	/* o[h][0..d) += sum_t P(h, t) * V[t][h / group] for t < ntok, with P the
	 * weights softmax_block left in S; `next` as for score. */
	void (*accum)(const void *V, const float *P, const da_dims *dm, uint32_t ntok, float *o,
		      ptrdiff_t next);
	/* The online-softmax step after `score`, for every query head h: with
	 * mx the max of its scores and m' = max(m[h], mx), replace each score s
	 * by exp(s - m'), set l[h] = l[h] * exp(m[h] - m') + their sum, scale
	 * o[h][0..d) by exp(m[h] - m'), and m[h] = m'. */
	void (*softmax_block)(float *S, uint32_t ntok, const da_dims *dm, float *m, float *l,
			      float *o);
} da_isa;

extern const da_isa da_isa_portable;
/* Defined only on x86-64; use each only where the CPU has the instructions:
 * AVX2, FMA and F16C; AVX-512F. */
extern const da_isa da_isa_avx2;
extern const da_isa da_isa_avx512;

/* fp16 and bf16 to fp32, exactly (the portable path and the tests use them). */
static inline float da_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
	uint32_t exp = (h >> 10) & 0x1fu;
	uint32_t man = h & 0x3ffu;
	uint32_t bits;
	if (exp == 0x1f) {
		bits = sign | 0x7f800000u | (man << 13); /* inf or nan */
	} else if (exp != 0) {
		bits = sign | ((exp + 112u) << 23) | (man << 13);
	} else if (man == 0) {
		bits = sign; /* signed zero */
	} else {
		/* Subnormal: normalise the mantissa. */
		exp = 113;
		while (!(man & 0x400u)) {
			man <<= 1;
			exp--;
		}
		bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
	}
	union {
		uint32_t u;
		float f;
	} v = {.u = bits};
	return v.f;
}

static inline float da_bf16_to_f32(uint16_t b)
{
	union {
		uint32_t u;
		float f;
	} v = {.u = (uint32_t)b << 16};
	return v.f;
}

#endif
