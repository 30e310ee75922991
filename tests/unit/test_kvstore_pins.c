/* kvstore: pinned cluster blocks (kvs_block_put / kvs_block_unpin). */
#include <errno.h>

#include "kvstore_testlib.h"

#define OK(expr)                                                                          \
	do {                                                                              \
		int rc_ = (expr);                                                         \
		cr_assert_eq(rc_, 0, "%s: %s", #expr, kvm_strerror(rc_));                 \
	} while (0)

#define BB 256 /* tl_geom's block bytes */

static void check(struct tl *t)
{
	int rc = kvs_store_check(t->s, KVS_CHECK_CSUM);
	cr_assert_eq(rc, 0, "check: %s", t->last_log);
}

static void fill(unsigned char *b, unsigned char v)
{
	for (int i = 0; i < BB; i++)
		b[i] = (unsigned char)(v + i);
}

static kvs_store_stats stats(struct tl *t)
{
	kvs_store_stats st;
	kvs_store_get_stats(t->s, &st);
	return st;
}

Test(kvstore_pins, put_read_unpin_unkeyed)
{
	struct tl t;
	tl_open(&t, 4, 0, 4);
	unsigned char b[BB];
	fill(b, 7);
	kvs_block_ref r;
	OK(kvs_block_put(t.s, NULL, b, &r));
	cr_assert(r.sealed && r.node == KVS_NODE_LOCAL && r.refs == 1);
	cr_assert_eq(memcmp(r.ptr, b, BB), 0, "bytes copied");
	OK(kvs_block_verify(t.s, r.block));
	kvs_store_stats st = stats(&t);
	cr_assert_eq(st.tier[0].used, 1);
	cr_assert_eq(st.tier[0].referenced, 1, "a pin is a reference");
	cr_assert_eq(st.tier[0].evictable, 0);
	cr_assert_eq(st.pins, 1);
	cr_assert_eq(st.n_indexed, 0, "unkeyed blocks are not indexed");
	check(&t);
	OK(kvs_block_unpin(t.s, r.block));
	st = stats(&t);
	cr_assert_eq(st.tier[0].used, 0, "unkeyed: freed by its last unpin");
	cr_assert_eq(kvs_block_unpin(t.s, r.block), -ESTALE);
	cr_assert_eq(kvs_block_get(t.s, r.block, &r), -ESTALE);
	check(&t);
	tl_close(&t);
}

Test(kvstore_pins, keyed_dedup_and_cache)
{
	struct tl t;
	tl_open(&t, 4, 0, 4);
	unsigned char b[BB];
	fill(b, 1);
	kvs_key k = kvs_key_chain(KVS_KEY_ROOT, TL_MODEL, (uint32_t[]){1, 2, 3, 4}, 4);
	kvs_block_ref r1, r2;
	OK(kvs_block_put(t.s, &k, b, &r1));
	OK(kvs_block_put(t.s, &k, b, &r2));
	cr_assert_eq(r1.block, r2.block, "an equal key pins the stored block");
	cr_assert_eq(r2.refs, 2);
	kvs_store_stats st = stats(&t);
	cr_assert_eq(st.tier[0].used, 1);
	cr_assert_eq(st.dedups, 1);
	cr_assert_eq(st.pins, 2);
	cr_assert_eq(st.n_indexed, 1);
	kvs_block_id found;
	OK(kvs_store_lookup(t.s, k, &found));
	cr_assert_eq(found, r1.block);
	/* A sequence can share a pinned block through the prefix index. */
	OK(kvs_seq_create(t.s, 9));
	uint32_t matched;
	OK(kvs_seq_attach_prefix(t.s, 9, (uint32_t[]){1, 2, 3, 4}, 4, &matched));
	cr_assert_eq(matched, 4);
	check(&t);
	OK(kvs_block_unpin(t.s, r1.block));
	OK(kvs_block_unpin(t.s, r1.block));
	cr_assert_eq(kvs_block_unpin(t.s, r1.block), -EINVAL, "no pin left");
	st = stats(&t);
	cr_assert_eq(st.tier[0].referenced, 1, "still listed by the sequence");
	OK(kvs_seq_release(t.s, 9));
	st = stats(&t);
	cr_assert_eq(st.tier[0].evictable, 1, "keyed: stays cached once unpinned");
	check(&t);
	tl_close(&t);
}

Test(kvstore_pins, stale_ids_after_eviction)
{
	struct tl t;
	tl_open(&t, 2, 0, 4);
	unsigned char b[BB];
	kvs_key k[3];
	kvs_block_ref r[3];
	for (int i = 0; i < 3; i++) {
		fill(b, (unsigned char)(10 * i));
		k[i] = kvs_key_chain(KVS_KEY_ROOT, TL_MODEL, (uint32_t[]){(uint32_t)i, 0, 0, 0}, 4);
	}
	fill(b, 0);
	OK(kvs_block_put(t.s, &k[0], b, &r[0]));
	OK(kvs_block_unpin(t.s, r[0].block)); /* cached, evictable */
	fill(b, 10);
	OK(kvs_block_put(t.s, &k[1], b, &r[1]));
	fill(b, 20);
	OK(kvs_block_put(t.s, &k[2], b, &r[2])); /* evicts block 0 */
	kvs_block_ref x;
	cr_assert_eq(kvs_block_get(t.s, r[0].block, &x), -ESTALE, "evicted: its id is stale");
	cr_assert_eq(kvs_block_unpin(t.s, r[0].block), -ESTALE);
	cr_assert_eq(kvs_store_lookup(t.s, k[0], &x.block), -ENOENT);
	OK(kvs_block_get(t.s, r[2].block, &x));
	cr_assert_eq(((unsigned char *)x.ptr)[0], 20);
	check(&t);
	tl_close(&t);
}

Test(kvstore_pins, enospc_when_every_slot_is_pinned)
{
	struct tl t;
	tl_open(&t, 2, 1, 4);
	unsigned char b[BB];
	kvs_block_ref r[3];
	for (int i = 0; i < 3; i++) {
		fill(b, (unsigned char)i);
		OK(kvs_block_put(t.s, NULL, b, &r[i]));
	}
	cr_assert_eq(r[2].tier, KVS_TIER_SLOW, "the slow tier once the fast one is full");
	cr_assert_eq(kvs_block_put(t.s, NULL, b, &r[0]), -ENOSPC);
	kvs_store_stats st = stats(&t);
	cr_assert_eq(st.enospc, 1);
	cr_assert(strstr(t.last_log, "kvstore_full"), "%s", t.last_log);
	/* Pinned blocks are not demoted to make room for a tail either. */
	OK(kvs_seq_create(t.s, 1));
	kvs_tail_view v;
	cr_assert_eq(kvs_seq_append(t.s, 1, (uint32_t[]){1}, 1, &v), -ENOSPC);
	OK(kvs_block_unpin(t.s, r[1].block));
	OK(kvs_seq_append(t.s, 1, (uint32_t[]){1}, 1, &v));
	check(&t);
	cr_assert_eq(kvs_block_put(t.s, NULL, NULL, &r[0]), -EINVAL);
	tl_close(&t);
}
