#include "kvstore/geom.h"

#include <errno.h>

size_t kvs_geom_elem_bytes(const kvs_geom *g)
{
	return da_dtype_size(g->dtype);
}

int kvs_geom_check(const kvs_geom *g)
{
	if (!g || g->layers == 0 || g->layers > KVS_MAX_LAYERS || g->kv_heads == 0 ||
	    g->kv_heads > DA_MAX_HEADS || g->head_dim == 0 || g->head_dim > DA_MAX_HEAD_DIM ||
	    g->block_tokens == 0 || g->block_tokens > DA_MAX_BLOCK_TOKENS ||
	    kvs_geom_elem_bytes(g) == 0)
		return -EINVAL;
	return 0;
}

size_t kvs_geom_block_bytes(const kvs_geom *g)
{
	if (kvs_geom_check(g))
		return 0;
	/* With the limits above this is at most 2^10 * 2 * 2^12 * 2^8 * 2^9 * 4
	 * = 2^42 bytes: no overflow in size_t on a 64-bit host. */
	return (size_t)g->layers * 2 * g->block_tokens * g->kv_heads * g->head_dim *
	       kvs_geom_elem_bytes(g);
}

size_t kvs_geom_offset(const kvs_geom *g, uint32_t layer, uint32_t kv, uint32_t token,
		       uint32_t kv_head)
{
	size_t row = (size_t)g->kv_heads * g->head_dim; /* elements of one token */
	size_t half = row * g->block_tokens;            /* one layer's K (or V) */
	size_t el = ((size_t)layer * 2 + kv) * half + (size_t)token * row +
		    (size_t)kv_head * g->head_dim;
	return el * kvs_geom_elem_bytes(g);
}
