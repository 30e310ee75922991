/* For tests against a real cluster: a sequence's KV kept in the test too,
 * in the paged block layout, with random K/V per token, and the local
 * kernel's answer over it (the reference cluster attention must equal). */
#ifndef KVMESH_TESTS_REF_KV_H
#define KVMESH_TESTS_REF_KV_H

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "client/kvmesh.h"
#include "kernels/distattn.h"

typedef struct ref_seq {
	const kvm_model *m;
	uint8_t **blocks;
	uint32_t n_blocks;
	uint32_t tokens;
	uint64_t rng;
} ref_seq;

static inline float frand(uint64_t *s)
{
	*s = *s * 6364136223846793005ull + 1442695040888963407ull;
	return (float)((double)(*s >> 11) / 4503599627370496.0 - 1.0);
}

static inline void put_elem(kvm_dtype t, void *row, size_t i, float v)
{
	if (t == KVM_F32) {
		((float *)row)[i] = v;
	} else if (t == KVM_F16) {
		((_Float16 *)row)[i] = (_Float16)v;
	} else {
		uint32_t u;
		memcpy(&u, &v, 4);
		((uint16_t *)row)[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
	}
}

static inline void random_row(ref_seq *r, void *row, float amp)
{
	size_t n = (size_t)r->m->kv_heads * r->m->head_dim;
	for (size_t i = 0; i < n; i++)
		put_elem(r->m->dtype, row, i, amp * frand(&r->rng));
}

/* Appends one token of random K/V (every layer) to the local copy. */
static inline void ref_append(ref_seq *r)
{
	const kvm_model *m = r->m;
	uint32_t bt = m->block_tokens, pos = r->tokens;
	if (pos / bt >= r->n_blocks) {
		r->blocks = realloc(r->blocks, (r->n_blocks + 1) * sizeof(*r->blocks));
		r->blocks[r->n_blocks++] = calloc(1, kvm_block_bytes(m));
	}
	size_t row = kvm_row_bytes(m);
	for (uint32_t l = 0; l < m->layers; l++) {
		uint8_t *kp = r->blocks[pos / bt] + ((size_t)l * 2 * bt + pos % bt) * row;
		random_row(r, kp, 2.0f);
		random_row(r, kp + (size_t)bt * row, 1.0f);
	}
	r->tokens++;
}

/* Token pos's K (v = 0) or V (v = 1) row of `layer`. */
static inline uint8_t *ref_row(ref_seq *r, uint32_t layer, uint32_t pos, int v)
{
	uint32_t bt = r->m->block_tokens;
	size_t row = kvm_row_bytes(r->m);
	return r->blocks[pos / bt] + ((size_t)layer * 2 * bt + (size_t)v * bt + pos % bt) * row;
}

static inline void ref_free(ref_seq *r)
{
	for (uint32_t i = 0; i < r->n_blocks; i++)
		free(r->blocks[i]);
	free(r->blocks);
}

/* The local kernel's answer for query q at `layer` over all r->tokens;
 * 0 or a negative errno. */
static inline int ref_attend(ref_seq *r, uint32_t layer, const float *q, float *o, float *lse)
{
	const kvm_model *m = r->m;
	da_ctx *ctx;
	if (da_ctx_create(1, &ctx) != 0)
		return -ENOMEM;
	da_shape s = {.q_heads = m->q_heads, .kv_heads = m->kv_heads, .head_dim = m->head_dim,
		      .block_tokens = m->block_tokens, .layer = layer,
		      .kv_dtype = m->dtype == KVM_F32 ? DA_F32 : m->dtype == KVM_F16 ? DA_F16 : DA_BF16,
		      .scale = 1.0f / sqrtf((float)m->head_dim)};
	uint32_t nb = (r->tokens + m->block_tokens - 1) / m->block_tokens, start[2] = {0, nb}, nt = r->tokens;
	da_batch b = {.n_queries = 1, .q = q, .blocks = (const void *const *)r->blocks, .block_start = start,
		      .n_tokens = &nt, .max_blocks = nb};
	int rc = da_partial_cpu(ctx, &s, &b, o, lse);
	da_ctx_destroy(ctx);
	return rc;
}

#endif
