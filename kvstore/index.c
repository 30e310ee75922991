#include "kvstore/index.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static inline const kvs_key *rec_key(const struct kvs_index *ix, uint32_t rec)
{
	return (const kvs_key *)(const void *)(ix->recs + (size_t)rec * ix->stride);
}

/* Seqlock writer side (the store lock is held). */
static void write_begin(struct kvs_index *ix)
{
	__atomic_store_n(&ix->seq, ix->seq + 1, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
}

static void write_end(struct kvs_index *ix)
{
	__atomic_store_n(&ix->seq, ix->seq + 1, __ATOMIC_RELEASE);
}

static void ent_store(struct kvs_index *ix, uint32_t i, uint64_t lo, uint32_t hi, uint32_t rec)
{
	struct kvs_index_ent *e = &ix->ents[i];
	__atomic_store_n(&e->rec, rec, __ATOMIC_RELAXED);
	__atomic_store_n(&e->lo, lo, __ATOMIC_RELAXED);
	__atomic_store_n(&e->hi, hi, __ATOMIC_RELAXED);
}

int kvs_index_init(struct kvs_index *ix, uint32_t max, const void *recs, size_t stride)
{
	memset(ix, 0, sizeof *ix);
	if (max == 0 || max > (UINT32_C(1) << 30) || !recs || stride < sizeof(kvs_key))
		return -EINVAL;
	/* Load <= 2/3: short probe runs, and at most 48 bytes per entry. */
	uint64_t n = 16;
	while (2 * n < 3 * (uint64_t)max)
		n <<= 1;
	ix->ents = malloc(n * sizeof *ix->ents);
	if (!ix->ents)
		return -ENOMEM;
	for (uint64_t i = 0; i < n; i++)
		ix->ents[i] = (struct kvs_index_ent){0, 0, KVS_INDEX_NONE};
	ix->mask = (uint32_t)(n - 1);
	ix->max = max;
	ix->recs = recs;
	ix->stride = stride;
	return 0;
}

void kvs_index_fini(struct kvs_index *ix)
{
	free(ix->ents);
	ix->ents = NULL;
}

uint32_t kvs_index_find(const struct kvs_index *ix, kvs_key key)
{
	uint32_t i = (uint32_t)key.lo & ix->mask;
	for (;;) {
		const struct kvs_index_ent *e = &ix->ents[i];
		if (e->rec == KVS_INDEX_NONE)
			return KVS_INDEX_NONE;
		if (e->lo == key.lo && e->hi == (uint32_t)key.hi &&
		    kvs_key_eq(*rec_key(ix, e->rec), key))
			return e->rec;
		i = (i + 1) & ix->mask;
	}
}

int kvs_index_insert(struct kvs_index *ix, kvs_key key, uint32_t rec)
{
	uint32_t i = (uint32_t)key.lo & ix->mask;
	if (rec == KVS_INDEX_NONE)
		return -EINVAL;
	for (;;) {
		const struct kvs_index_ent *e = &ix->ents[i];
		if (e->rec == KVS_INDEX_NONE)
			break;
		if (e->lo == key.lo && e->hi == (uint32_t)key.hi &&
		    kvs_key_eq(*rec_key(ix, e->rec), key))
			return -EEXIST;
		i = (i + 1) & ix->mask;
	}
	if (ix->count >= ix->max)
		return -ENOSPC;
	write_begin(ix);
	ent_store(ix, i, key.lo, (uint32_t)key.hi, rec);
	write_end(ix);
	ix->count++;
	return 0;
}

int kvs_index_remove(struct kvs_index *ix, kvs_key key, uint32_t rec)
{
	uint32_t i = (uint32_t)key.lo & ix->mask;
	for (;;) {
		const struct kvs_index_ent *e = &ix->ents[i];
		if (e->rec == KVS_INDEX_NONE)
			return -ENOENT;
		if (e->rec == rec && e->lo == key.lo)
			break;
		i = (i + 1) & ix->mask;
	}
	/* Backward-shift deletion: pull later entries of the run into the hole
	 * when that keeps them reachable from their home, so no tombstones
	 * accumulate under churn. */
	write_begin(ix);
	for (uint32_t j = (i + 1) & ix->mask;; j = (j + 1) & ix->mask) {
		struct kvs_index_ent e = ix->ents[j];
		if (e.rec == KVS_INDEX_NONE)
			break;
		uint32_t home = (uint32_t)e.lo & ix->mask;
		if (((j - home) & ix->mask) >= ((j - i) & ix->mask)) {
			ent_store(ix, i, e.lo, e.hi, e.rec);
			i = j;
		}
	}
	ent_store(ix, i, 0, 0, KVS_INDEX_NONE);
	write_end(ix);
	ix->count--;
	return 0;
}

size_t kvs_index_bytes(const struct kvs_index *ix)
{
	return ((size_t)ix->mask + 1) * sizeof *ix->ents;
}
