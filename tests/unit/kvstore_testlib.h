/* Helpers shared by the kvstore test suites (header-only: every
 * tests/unit/test_*.c is its own program). */
#ifndef KVMESH_TESTS_KVSTORE_TESTLIB_H
#define KVMESH_TESTS_KVSTORE_TESTLIB_H

#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "common/kvm_error.h"
#include "kvstore/store.h"

/* A tiny block: 2 layers x K/V x 4 tokens x 1 head x 4 floats = 256 bytes. */
static const kvs_geom tl_geom = {.layers = 2, .kv_heads = 1, .head_dim = 4, .block_tokens = 4,
				 .dtype = DA_F32};
#define TL_BT 4
#define TL_MODEL 42

struct tl {
	kvs_arena *arena[2];
	kvs_store *s;
	unsigned log_lines;
	char last_log[512];
};

static inline void tl_log(void *arg, const char *line)
{
	struct tl *t = arg;
	t->log_lines++;
	snprintf(t->last_log, sizeof t->last_log, "%s", line);
}

/* A store with n0 fast slots and n1 slow slots (0: one tier), both host. */
static inline void tl_open(struct tl *t, uint32_t n0, uint32_t n1, uint32_t max_seqs)
{
	memset(t, 0, sizeof *t);
	size_t bb = kvs_geom_block_bytes(&tl_geom);
	uint32_t n[2] = {n0, n1};
	for (int i = 0; i < 2 && n[i]; i++) {
		kvs_arena_opts o = {.slot_bytes = bb, .n_slots = n[i],
				    .flags = KVS_ARENA_NO_HUGETLB};
		cr_assert_eq(kvs_arena_create_host(&o, &t->arena[i]), 0);
	}
	kvs_store_config c = {.geom = tl_geom, .model = TL_MODEL, .max_seqs = max_seqs,
			      .log = tl_log, .log_arg = t};
	c.tiers[0] = t->arena[0];
	c.tiers[1] = t->arena[1];
	int rc = kvs_store_create(&c, &t->s);
	cr_assert_eq(rc, 0, "store: %s", kvm_strerror(rc));
}

static inline void tl_close(struct tl *t)
{
	kvs_store_destroy(t->s);
	kvs_arena_destroy(t->arena[0]);
	kvs_arena_destroy(t->arena[1]);
}

/* Content of a token's K/V: a function of the whole prefix up to it, as real
 * KV is. rh is a running hash of the prefix (tl_roll). */
static inline uint64_t tl_roll(uint64_t rh, uint32_t tok)
{
	rh ^= tok + 0x9E3779B97F4A7C15ull + (rh << 6) + (rh >> 2);
	rh *= 0xBF58476D1CE4E5B9ull;
	return rh ^ (rh >> 31);
}

static inline uint32_t tl_word(uint64_t rh, uint32_t l, uint32_t kv, uint32_t d)
{
	return (uint32_t)(rh >> 17) ^ (l * 0x9E3779B1u) ^ (kv * 0x85EBCA77u) ^ (d * 0xC2B2AE3Du);
}

/* Writes (or checks, returning the count of wrong words) one token's K/V in
 * a host block. */
static inline unsigned tl_token(void *block, uint32_t tok_in_block, uint64_t rh, int check)
{
	unsigned bad = 0;
	for (uint32_t l = 0; l < tl_geom.layers; l++)
		for (uint32_t kv = 0; kv < 2; kv++) {
			uint32_t *v = (uint32_t *)((unsigned char *)block +
						   kvs_geom_offset(&tl_geom, l, kv, tok_in_block, 0));
			for (uint32_t d = 0; d < tl_geom.head_dim; d++) {
				uint32_t w = tl_word(rh, l, kv, d);
				if (check)
					bad += v[d] != w;
				else
					v[d] = w;
			}
		}
	return bad;
}

/* Appends tokens[0..n) to seq, writing their K/V; prefix_rh is the running
 * hash before tokens[0] and is advanced. Returns 0 or the store's error. */
static inline int tl_append(struct tl *t, kvs_seq_id id, const uint32_t *tokens, uint32_t n,
			    uint64_t *prefix_rh)
{
	while (n) {
		kvs_tail_view v;
		int rc = kvs_seq_append(t->s, id, tokens, n, &v);
		if (rc)
			return rc;
		for (uint32_t i = 0; i < v.n_taken; i++) {
			*prefix_rh = tl_roll(*prefix_rh, tokens[i]);
			tl_token(v.ptr, v.first + i, *prefix_rh, 0);
		}
		tokens += v.n_taken;
		n -= v.n_taken;
	}
	return 0;
}

#endif
