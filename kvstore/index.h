/* Internal to kvstore: the prefix index, a map from block key to block
 * record, by open addressing with linear probing at load <= 1/2.
 *
 * An entry is 8 bytes: the record number and the low 32 bits of the key's
 * first word, which give the home bucket (so deletion never reads records)
 * and filter most non-matching entries; a candidate is confirmed against the
 * full key stored at offset 0 of its record. Not thread-safe: the store
 * serialises access. */
#ifndef KVMESH_KVSTORE_INDEX_H
#define KVMESH_KVSTORE_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "kvstore/key.h"

#define KVS_INDEX_NONE UINT32_MAX

struct kvs_index_ent {
	uint32_t tag; /* (uint32_t)key.lo */
	uint32_t rec; /* record number, KVS_INDEX_NONE when empty */
};

struct kvs_index {
	struct kvs_index_ent *ents;
	uint32_t mask;  /* buckets - 1 */
	uint32_t count; /* entries present */
	uint32_t max;   /* entries allowed */
	const unsigned char *recs;
	size_t stride; /* bytes between records; each starts with its kvs_key */
};

/* Sizes the table for max entries over the records at recs (borrowed, must
 * outlive the index). 0, -EINVAL or -ENOMEM. */
int kvs_index_init(struct kvs_index *ix, uint32_t max, const void *recs, size_t stride);
void kvs_index_fini(struct kvs_index *ix);

/* The record holding key, or KVS_INDEX_NONE. */
uint32_t kvs_index_find(const struct kvs_index *ix, kvs_key key);

/* Hints the CPU to fetch key's bucket. Safe without the store lock: it only
 * reads the table's address and size, which never change. */
static inline void kvs_index_prefetch(const struct kvs_index *ix, kvs_key key)
{
	__builtin_prefetch(&ix->ents[(uint32_t)key.lo & ix->mask]);
}

/* Adds key -> rec (the record must already hold key). -EEXIST, -ENOSPC. */
int kvs_index_insert(struct kvs_index *ix, kvs_key key, uint32_t rec);

/* Removes key if it maps to rec. -ENOENT otherwise. */
int kvs_index_remove(struct kvs_index *ix, kvs_key key, uint32_t rec);

/* Bytes of the table. */
size_t kvs_index_bytes(const struct kvs_index *ix);

#endif
