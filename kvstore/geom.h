/* Block geometry: how many bytes one KV block of a model takes and where each
 * token's K and V vectors sit inside it.
 *
 * A block holds `block_tokens` tokens of one sequence for every layer, laid out
 * as [layer][k|v][token][kv_head][head_dim] (the design guide's layout, which
 * the DistAttention kernels read), so one layer's K of one block is contiguous
 * and followed by its V. */
#ifndef KVMESH_KVSTORE_GEOM_H
#define KVMESH_KVSTORE_GEOM_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/distattn.h" /* da_dtype only */

#ifdef __cplusplus
extern "C" {
#endif

/* Largest layer count accepted (the other limits are the kernels'). */
#define KVS_MAX_LAYERS 1024

typedef struct kvs_geom {
	uint32_t layers;       /* 1..KVS_MAX_LAYERS */
	uint32_t kv_heads;     /* 1..DA_MAX_HEADS */
	uint32_t head_dim;     /* 1..DA_MAX_HEAD_DIM */
	uint32_t block_tokens; /* 1..DA_MAX_BLOCK_TOKENS */
	da_dtype dtype;        /* DA_F32, DA_F16 or DA_BF16 */
} kvs_geom;

/* Returns 0 if every field is in range, else -EINVAL. */
int kvs_geom_check(const kvs_geom *g);

/* Bytes of one element of g->dtype (0 for an unknown type). */
size_t kvs_geom_elem_bytes(const kvs_geom *g);

/* Bytes of one block, or 0 if the geometry is invalid. */
size_t kvs_geom_block_bytes(const kvs_geom *g);

/* Byte offset inside a block of the head_dim vector of (layer, kv = 0 for K or
 * 1 for V, token, kv_head). Arguments are not range-checked: the caller passes
 * a checked geometry and indices below its limits. */
size_t kvs_geom_offset(const kvs_geom *g, uint32_t layer, uint32_t kv, uint32_t token,
		       uint32_t kv_head);

#ifdef __cplusplus
}
#endif
#endif
