/* Internal to kvstore: the prefix index, a map from block key to block
 * record, by open addressing with linear probing at load <= 2/3.
 *
 * An entry is 16 bytes: the key's first word (which also gives the home
 * bucket, so deletion never reads records), the low half of its second word,
 * and the record number. kvs_index_probe() answers from the entry alone (96
 * key bits: a false match needs two stored keys equal in 96 bits, odds of
 * about 2^-76 at 1M blocks), so a lookup costs one cache miss; kvs_index_find()
 * also confirms the full key at offset 0 of the record, and is what every
 * path that hands out a block uses.
 *
 * Writers (insert, remove) are serialised by the store's lock. Probes may
 * also run without it, as seqlock readers: kvs_index_read_begin(), probes,
 * then kvs_index_read_ok() says whether a writer ran meanwhile (then the
 * answer is void: retry, or take the lock). For that, every entry field is
 * written with atomic stores and read with atomic loads (plain moves on
 * x86), and a writer makes the sequence number odd while it changes the
 * table. */
#ifndef KVMESH_KVSTORE_INDEX_H
#define KVMESH_KVSTORE_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "kvstore/key.h"

#define KVS_INDEX_NONE UINT32_MAX

struct kvs_index_ent {
	uint64_t lo;  /* key.lo */
	uint32_t hi;  /* (uint32_t)key.hi */
	uint32_t rec; /* record number, KVS_INDEX_NONE when empty */
};

struct kvs_index {
	struct kvs_index_ent *ents;
	uint32_t mask;  /* buckets - 1 */
	uint32_t count; /* entries present */
	uint32_t max;   /* entries allowed */
	const unsigned char *recs;
	size_t stride; /* bytes between records; each starts with its kvs_key */
	uint64_t seq;  /* odd while a writer changes the table (atomic access) */
};

/* Sizes the table for max entries over the records at recs (borrowed, must
 * outlive the index). 0, -EINVAL or -ENOMEM. */
int kvs_index_init(struct kvs_index *ix, uint32_t max, const void *recs, size_t stride);
void kvs_index_fini(struct kvs_index *ix);

/* The record holding key (full key confirmed), or KVS_INDEX_NONE. */
uint32_t kvs_index_find(const struct kvs_index *ix, kvs_key key);

/* The record whose entry matches key in 96 bits, or KVS_INDEX_NONE: for
 * answers that hand out nothing (how long a stored prefix is). Under the
 * store lock, or between kvs_index_read_begin/ok; a probe racing a writer
 * may also give up early (KVS_INDEX_NONE), which read_ok then voids. */
static inline uint32_t kvs_index_probe(const struct kvs_index *ix, kvs_key key)
{
	uint32_t i = (uint32_t)key.lo & ix->mask;
	for (uint32_t steps = 0; steps <= ix->mask; steps++) {
		const struct kvs_index_ent *e = &ix->ents[i];
		uint32_t rec = __atomic_load_n(&e->rec, __ATOMIC_RELAXED);
		if (rec == KVS_INDEX_NONE)
			return KVS_INDEX_NONE;
		if (__atomic_load_n(&e->lo, __ATOMIC_RELAXED) == key.lo &&
		    __atomic_load_n(&e->hi, __ATOMIC_RELAXED) == (uint32_t)key.hi)
			return rec;
		i = (i + 1) & ix->mask;
	}
	return KVS_INDEX_NONE;
}

/* Lock-free reading: the sequence number to hand to kvs_index_read_ok; odd
 * means a writer is active (read_ok will fail). */
static inline uint64_t kvs_index_read_begin(const struct kvs_index *ix)
{
	return __atomic_load_n(&ix->seq, __ATOMIC_ACQUIRE);
}

/* Nonzero if no writer changed the table since read_begin returned v. */
static inline int kvs_index_read_ok(const struct kvs_index *ix, uint64_t v)
{
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	return !(v & 1) && __atomic_load_n(&ix->seq, __ATOMIC_RELAXED) == v;
}

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
