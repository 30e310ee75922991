/* Block keys: full blocks are content-addressed by a 128-bit chained hash
 *
 *   key = XXH3-128(parent.lo | parent.hi | model | tokens[0..n))
 *
 * over little-endian 64-bit words and 32-bit token ids, where `parent` is the
 * key of the previous block of the sequence (KVS_KEY_ROOT for the first one).
 * Equal prefixes of equal models therefore have equal keys and share blocks;
 * a key also pins the block's position, since it covers every earlier token. */
#ifndef KVMESH_KVSTORE_KEY_H
#define KVMESH_KVSTORE_KEY_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs_key {
	uint64_t lo, hi;
} kvs_key;

/* The parent of a sequence's first block. */
#define KVS_KEY_ROOT ((kvs_key){0, 0})

/* The key of the block holding tokens[0..n) after the block keyed `parent`. */
kvs_key kvs_key_chain(kvs_key parent, uint64_t model, const uint32_t *tokens, uint32_t n);

/* The 16-byte form of a key in protos and on the wire: lo then hi, each
 * little-endian (the coordinator, the agents and clients all use it). */
void kvs_key_to_bytes(kvs_key k, uint8_t out[16]);
kvs_key kvs_key_from_bytes(const uint8_t in[16]);

static inline bool kvs_key_eq(kvs_key a, kvs_key b)
{
	return a.lo == b.lo && a.hi == b.hi;
}

#ifdef __cplusplus
}
#endif
#endif
