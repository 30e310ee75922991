/* kvstore: blocks, sequences, prefix sharing, eviction, tiering, accounting. */
#include <errno.h>
#include <pthread.h>

#include "kvstore_testlib.h"

#define OK(expr)                                                                          \
	do {                                                                              \
		int rc_ = (expr);                                                         \
		cr_assert_eq(rc_, 0, "%s: %s", #expr, kvm_strerror(rc_));                 \
	} while (0)

static const uint32_t P[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

static void check(struct tl *t)
{
	int rc = kvs_store_check(t->s, KVS_CHECK_CSUM);
	cr_assert_eq(rc, 0, "check: %s", t->last_log);
}

/* Checks every local block of seq against the content of tokens[0..). */
static void check_bytes(struct tl *t, kvs_seq_id id, const uint32_t *tokens)
{
	kvs_seq_info si;
	kvs_block_ref r[64];
	uint32_t n;
	OK(kvs_seq_get_info(t->s, id, &si));
	OK(kvs_seq_blocks(t->s, id, 0, r, 64, &n));
	cr_assert_eq(n, si.n_blocks);
	uint64_t rh = 0;
	for (uint64_t p = 0; p < si.n_tokens; p++) {
		rh = tl_roll(rh, tokens[p]);
		const kvs_block_ref *b = &r[p / TL_BT];
		if (b->node != KVS_NODE_LOCAL)
			continue;
		cr_assert_eq(tl_token(b->ptr, (uint32_t)(p % TL_BT), rh, 1), 0,
			     "seq %llu token %llu: wrong bytes", (unsigned long long)id,
			     (unsigned long long)p);
	}
}

Test(kvstore_store, append_seal_and_block_list)
{
	struct tl t;
	tl_open(&t, 8, 0, 4);
	uint64_t rh = 0;
	OK(kvs_seq_create(t.s, 1));
	cr_assert_eq(kvs_seq_create(t.s, 1), -EEXIST);
	OK(tl_append(&t, 1, P, 6, &rh));
	kvs_seq_info si;
	OK(kvs_seq_get_info(t.s, 1, &si));
	cr_assert_eq(si.n_tokens, 6);
	cr_assert_eq(si.n_blocks, 2, "one sealed block and a tail");
	cr_assert_eq(si.tail_fill, 2);
	kvs_block_ref r[4];
	uint32_t n;
	OK(kvs_seq_blocks(t.s, 1, 0, r, 4, &n));
	cr_assert_eq(n, 2);
	cr_assert(r[0].sealed && !r[1].sealed);
	kvs_key k0 = kvs_key_chain(KVS_KEY_ROOT, TL_MODEL, P, 4);
	cr_assert(kvs_key_eq(r[0].key, k0));
	cr_assert(kvs_key_eq(si.last_key, k0));
	cr_assert_eq(kvs_seq_seal(t.s, 1), -EINVAL, "tail not full");
	OK(tl_append(&t, 1, P + 6, 2, &rh));
	OK(kvs_seq_seal(t.s, 1));
	OK(kvs_seq_blocks(t.s, 1, 0, r, 4, &n));
	cr_assert_eq(n, 2);
	cr_assert(r[1].sealed);
	cr_assert(kvs_key_eq(r[1].key, kvs_key_chain(k0, TL_MODEL, P + 4, 4)));
	check_bytes(&t, 1, P);
	check(&t);
	kvs_store_stats st;
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.seals, 2);
	cr_assert_eq(st.tier[0].used, 2);
	cr_assert_eq(st.tier[0].referenced, 2);
	cr_assert_eq(st.n_indexed, 2);
	OK(kvs_seq_release(t.s, 1));
	cr_assert_eq(kvs_seq_release(t.s, 1), -ENOENT);
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.tier[0].evictable, 2, "released blocks stay cached");
	cr_assert_eq(st.tier[0].used + st.tier[0].free, st.tier[0].capacity);
	check(&t);
	tl_close(&t);
}

Test(kvstore_store, identical_prefixes_share_blocks)
{
	struct tl t;
	tl_open(&t, 8, 0, 8);
	uint64_t rh1 = 0, rh2 = 0;
	OK(kvs_seq_create(t.s, 1));
	OK(kvs_seq_create(t.s, 2));
	OK(tl_append(&t, 1, P, 8, &rh1));
	OK(kvs_seq_seal(t.s, 1));
	/* Seq 2 computes the same prefix itself: its sealed blocks dedupe. */
	OK(tl_append(&t, 2, P, 8, &rh2));
	OK(kvs_seq_seal(t.s, 2));
	kvs_store_stats st;
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.dedups, 2);
	cr_assert_eq(st.tier[0].used, 2, "two blocks stored once");
	kvs_block_ref a[2], b[2];
	uint32_t n;
	OK(kvs_seq_blocks(t.s, 1, 0, a, 2, &n));
	OK(kvs_seq_blocks(t.s, 2, 0, b, 2, &n));
	cr_assert_eq(a[0].block, b[0].block);
	cr_assert_eq(a[1].refs, 2);
	/* Seq 3 attaches the prefix instead of computing it. */
	OK(kvs_seq_create(t.s, 3));
	uint32_t m;
	OK(kvs_seq_attach_prefix(t.s, 3, P, 11, &m));
	cr_assert_eq(m, 8, "whole blocks only");
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.hits, 2);
	cr_assert_eq(st.misses, 0);
	check_bytes(&t, 3, P);
	/* Diverging after one block: one hit, one miss. */
	uint32_t q[8] = {1, 2, 3, 4, 9, 9, 9, 9};
	OK(kvs_seq_create(t.s, 4));
	OK(kvs_seq_attach_prefix(t.s, 4, q, 8, &m));
	cr_assert_eq(m, 4);
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.hits, 3);
	cr_assert_eq(st.misses, 1);
	OK(kvs_store_match(t.s, P, 16, &m));
	cr_assert_eq(m, 2);
	kvs_key keys[3] = {kvs_key_chain(KVS_KEY_ROOT, TL_MODEL, P, 4)};
	keys[1] = kvs_key_chain(keys[0], TL_MODEL, P + 4, 4);
	keys[2] = kvs_key_chain(keys[1], TL_MODEL, P + 8, 4);
	OK(kvs_store_match_keys(t.s, keys, 3, &m));
	cr_assert_eq(m, 2);
	kvs_block_id id;
	OK(kvs_store_lookup(t.s, keys[1], &id));
	cr_assert_eq(id, a[1].block);
	cr_assert_eq(kvs_store_lookup(t.s, keys[2], &id), -ENOENT);
	/* A sequence with a tail cannot attach. */
	uint64_t rh = 0;
	OK(kvs_seq_create(t.s, 5));
	OK(tl_append(&t, 5, q, 1, &rh));
	cr_assert_eq(kvs_seq_attach_prefix(t.s, 5, P, 8, &m), -EBUSY);
	check(&t);
	tl_close(&t);
}

Test(kvstore_store, lru_eviction_and_stale_block_ids)
{
	struct tl t;
	tl_open(&t, 3, 0, 4);
	uint32_t a[4] = {1, 1, 1, 1}, b[4] = {2, 2, 2, 2}, c[4] = {3, 3, 3, 3}, d[4] = {4, 4, 4, 4};
	const uint32_t *v[4] = {a, b, c, d};
	kvs_block_id ids[4];
	for (int i = 0; i < 3; i++) {
		uint64_t rh = 0;
		uint32_t n;
		kvs_block_ref r;
		OK(kvs_seq_create(t.s, (kvs_seq_id)i));
		OK(tl_append(&t, (kvs_seq_id)i, v[i], 4, &rh));
		OK(kvs_seq_seal(t.s, (kvs_seq_id)i));
		OK(kvs_seq_blocks(t.s, (kvs_seq_id)i, 0, &r, 1, &n));
		ids[i] = r.block;
	}
	/* Release in the order b, a, c: b is least recently used. */
	OK(kvs_seq_release(t.s, 1));
	OK(kvs_seq_release(t.s, 0));
	OK(kvs_seq_release(t.s, 2));
	uint64_t rh = 0;
	OK(kvs_seq_create(t.s, 9));
	OK(tl_append(&t, 9, d, 4, &rh)); /* needs a slot: evicts b */
	kvs_block_ref r;
	cr_assert_eq(kvs_block_get(t.s, ids[1], &r), -ESTALE);
	cr_assert_eq(kvs_block_verify(t.s, ids[1]), -ESTALE);
	cr_assert_eq(kvs_block_move(t.s, ids[1], 0), -ESTALE);
	OK(kvs_block_get(t.s, ids[0], &r));
	OK(kvs_block_verify(t.s, ids[0]));
	uint32_t m;
	OK(kvs_store_match(t.s, b, 4, &m));
	cr_assert_eq(m, 0);
	OK(kvs_store_match(t.s, a, 4, &m));
	cr_assert_eq(m, 1);
	uint32_t got;
	OK(kvs_store_evict(t.s, 0, 10, &got));
	cr_assert_eq(got, 2, "a and c were evictable; d is a tail");
	cr_assert_eq(kvs_block_get(t.s, ids[0], &r), -ESTALE);
	kvs_store_stats st;
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.evictions, 3);
	cr_assert_eq(st.tier[0].used, 1);
	cr_assert_eq(st.tier[0].tails, 1);
	cr_assert_eq(kvs_store_evict(t.s, 1, 1, &got), -EINVAL, "no such tier");
	check(&t);
	tl_close(&t);
}

Test(kvstore_store, full_store_refuses_with_enospc_and_keeps_data)
{
	struct tl t;
	tl_open(&t, 2, 1, 4);
	uint64_t rh1 = 0, rh2 = 0;
	OK(kvs_seq_create(t.s, 1));
	OK(tl_append(&t, 1, P, 12, &rh1)); /* three blocks: every slot, all held */
	OK(kvs_seq_create(t.s, 2));
	kvs_tail_view v;
	unsigned before = t.log_lines;
	cr_assert_eq(kvs_seq_append(t.s, 2, P + 3, 1, &v), -ENOSPC);
	cr_assert_eq(t.log_lines, before + 1, "one log line");
	cr_assert(strstr(t.last_log, "event=kvstore_full") != NULL, "%s", t.last_log);
	cr_assert(strstr(t.last_log, "tier0_capacity=2") != NULL, "%s", t.last_log);
	kvs_store_stats st;
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.enospc, 1);
	cr_assert_eq(st.tier[0].free + st.tier[1].free, 0);
	check_bytes(&t, 1, P);
	check(&t);
	/* Sealing the full tail frees nothing, but releasing does. */
	OK(kvs_seq_release(t.s, 1));
	OK(tl_append(&t, 2, P + 3, 1, &rh2));
	check(&t);
	/* The sequence table has its own limit. */
	OK(kvs_seq_create(t.s, 3));
	OK(kvs_seq_create(t.s, 4));
	OK(kvs_seq_create(t.s, 5));
	cr_assert_eq(kvs_seq_create(t.s, 6), -ENOSPC);
	tl_close(&t);
}

Test(kvstore_store, tiering_demotes_cold_blocks_and_promotes_on_use)
{
	struct tl t;
	tl_open(&t, 2, 4, 8);
	uint64_t rh = 0;
	OK(kvs_seq_create(t.s, 1));
	OK(tl_append(&t, 1, P, 8, &rh));
	OK(kvs_seq_seal(t.s, 1));
	OK(kvs_seq_release(t.s, 1)); /* two cold blocks in the fast tier */
	/* A new sequence needs the fast tier: the cold blocks go down. */
	uint32_t q[8] = {7, 7, 7, 7, 7, 7, 7, 7};
	uint64_t rh2 = 0;
	OK(kvs_seq_create(t.s, 2));
	OK(tl_append(&t, 2, q, 8, &rh2));
	OK(kvs_seq_seal(t.s, 2));
	kvs_store_stats st;
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.demotions, 2);
	cr_assert_eq(st.evictions, 0, "moved, not dropped");
	cr_assert_eq(st.tier[1].evictable, 2);
	cr_assert_eq(st.tier[0].referenced, 2);
	uint32_t m;
	OK(kvs_store_match(t.s, P, 8, &m));
	cr_assert_eq(m, 2, "still matchable from the slow tier");
	/* Using them again moves them up (seq 2's blocks go down to make room,
	 * once seq 2 lets go of them). */
	OK(kvs_seq_release(t.s, 2));
	OK(kvs_seq_create(t.s, 3));
	OK(kvs_seq_attach_prefix(t.s, 3, P, 8, &m));
	cr_assert_eq(m, 8);
	kvs_block_ref r[2];
	uint32_t n;
	OK(kvs_seq_blocks(t.s, 3, 0, r, 2, &n));
	cr_assert_eq(r[0].tier, 0);
	cr_assert_eq(r[1].tier, 0);
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.promotions, 2);
	check_bytes(&t, 3, P);
	check(&t);
	/* An explicit move of a referenced block, and back. */
	OK(kvs_block_move(t.s, r[0].block, 1));
	OK(kvs_block_get(t.s, r[0].block, &r[0]));
	cr_assert_eq(r[0].tier, 1);
	check_bytes(&t, 3, P);
	OK(kvs_block_move(t.s, r[0].block, 0));
	cr_assert_eq(kvs_block_move(t.s, r[0].block, 2), -EINVAL);
	check_bytes(&t, 3, P);
	check(&t);
	tl_close(&t);
}

Test(kvstore_store, corruption_is_detected_on_verify_and_move)
{
	struct tl t;
	tl_open(&t, 4, 4, 4);
	uint64_t rh = 0;
	OK(kvs_seq_create(t.s, 1));
	OK(tl_append(&t, 1, P, 8, &rh));
	OK(kvs_seq_seal(t.s, 1));
	kvs_block_ref r[2];
	uint32_t n;
	OK(kvs_seq_blocks(t.s, 1, 0, r, 2, &n));
	OK(kvs_block_verify(t.s, r[0].block));
	((unsigned char *)r[0].ptr)[5] ^= 1; /* a bit flips */
	unsigned before = t.log_lines;
	cr_assert_eq(kvs_block_verify(t.s, r[0].block), -EIO);
	cr_assert(strstr(t.last_log, "checksum_mismatch") != NULL);
	cr_assert_eq(kvs_block_move(t.s, r[0].block, 1), -EIO, "not moved");
	cr_assert_eq(t.log_lines, before + 2);
	cr_assert_neq(kvs_store_check(t.s, KVS_CHECK_CSUM), 0);
	((unsigned char *)r[0].ptr)[5] ^= 1;
	OK(kvs_block_verify(t.s, r[0].block));
	/* A corrupt unreferenced block is dropped when verified. */
	((unsigned char *)r[1].ptr)[0] ^= 1;
	OK(kvs_seq_release(t.s, 1));
	cr_assert_eq(kvs_block_verify(t.s, r[1].block), -EIO);
	cr_assert_eq(kvs_block_get(t.s, r[1].block, &r[1]), -ESTALE);
	uint32_t m;
	OK(kvs_store_match(t.s, P, 8, &m));
	cr_assert_eq(m, 1);
	kvs_store_stats st;
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.csum_failures, 3);
	check(&t);
	tl_close(&t);
}

Test(kvstore_store, remote_entries_are_recorded_not_fetched)
{
	struct tl t;
	tl_open(&t, 4, 0, 4);
	uint64_t rh = 0;
	kvs_key rk = kvs_key_chain(KVS_KEY_ROOT, TL_MODEL, P, 4);
	OK(kvs_seq_create(t.s, 1));
	OK(kvs_seq_append_remote(t.s, 1, 7, 0xabcdef, rk));
	cr_assert_eq(kvs_seq_append_remote(t.s, 1, KVS_NODE_LOCAL, 1, rk), -EINVAL);
	rh = 0;
	for (int i = 0; i < 4; i++)
		rh = tl_roll(rh, P[i]);
	OK(tl_append(&t, 1, P + 4, 5, &rh));
	cr_assert_eq(kvs_seq_append_remote(t.s, 1, 7, 1, rk), -EBUSY, "tail open");
	kvs_block_ref r[3];
	uint32_t n;
	OK(kvs_seq_blocks(t.s, 1, 0, r, 3, &n));
	cr_assert_eq(n, 3);
	cr_assert_eq(r[0].node, 7);
	cr_assert_eq(r[0].remote, 0xabcdef);
	cr_assert_eq(r[0].block, KVS_BLOCK_NONE);
	/* The local block after it chains from the remote block's key. */
	cr_assert(kvs_key_eq(r[1].key, kvs_key_chain(rk, TL_MODEL, P + 4, 4)));
	check_bytes(&t, 1, P);
	kvs_seq_info si;
	OK(kvs_seq_get_info(t.s, 1, &si));
	cr_assert_eq(si.n_tokens, 9);
	kvs_store_stats st;
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.tier[0].used, 2, "nothing stored for the remote block");
	check(&t);
	tl_close(&t);
}

Test(kvstore_store, bad_arguments)
{
	struct tl t;
	tl_open(&t, 2, 0, 2);
	kvs_tail_view v;
	uint32_t m;
	cr_assert_eq(kvs_seq_append(t.s, 1, P, 1, &v), -ENOENT);
	OK(kvs_seq_create(t.s, 1));
	cr_assert_eq(kvs_seq_append(t.s, 1, P, 0, &v), -EINVAL);
	cr_assert_eq(kvs_seq_append(t.s, 1, NULL, 1, &v), -EINVAL);
	cr_assert_eq(kvs_seq_attach_prefix(t.s, 9, P, 4, &m), -ENOENT);
	cr_assert_eq(kvs_seq_seal(t.s, 1), -EINVAL);
	cr_assert_eq(kvs_block_get(t.s, 0, &(kvs_block_ref){0}), -ESTALE);
	cr_assert_eq(kvs_block_get(t.s, 0x1234567800000001ull, &(kvs_block_ref){0}), -ESTALE);
	OK(kvs_seq_append(t.s, 1, P, 1, &v));
	cr_assert_eq(kvs_block_verify(t.s, v.block), -EBUSY, "a tail has no checksum yet");
	cr_assert_eq(kvs_block_move(t.s, v.block, 0), -EBUSY);
	/* Geometry mismatch between store and arena. */
	kvs_store *s2;
	kvs_store_config c = {.geom = tl_geom, .max_seqs = 1};
	c.geom.head_dim = 8;
	c.tiers[0] = t.arena[0];
	cr_assert_eq(kvs_store_create(&c, &s2), -EINVAL);
	c.geom = tl_geom;
	c.tiers[1] = t.arena[0];
	cr_assert_eq(kvs_store_create(&c, &s2), -EINVAL, "one arena for two tiers");
	c.tiers[1] = NULL;
	c.tiers[0] = NULL;
	cr_assert_eq(kvs_store_create(&c, &s2), -EINVAL);
	kvs_store_stats st;
	kvs_store_get_stats(t.s, &st);
	cr_assert(st.meta_bytes_per_block > 0);
	tl_close(&t);
}

Test(kvstore_store, seal_replaces_a_corrupt_cached_copy)
{
	struct tl t;
	tl_open(&t, 2, 4, 4);
	uint64_t rh = 0;
	kvs_block_ref r;
	uint32_t n;
	OK(kvs_seq_create(t.s, 1));
	OK(tl_append(&t, 1, P, 4, &rh));
	OK(kvs_seq_seal(t.s, 1));
	OK(kvs_seq_blocks(t.s, 1, 0, &r, 1, &n));
	kvs_block_id old = r.block;
	OK(kvs_seq_release(t.s, 1));
	OK(kvs_block_move(t.s, old, 1)); /* cached, in the slow tier */
	OK(kvs_block_get(t.s, old, &r));
	((unsigned char *)r.ptr)[9] ^= 0x40;
	/* Seq 2 computes the same block; sealing finds the corrupt copy when
	 * it tries to bring it up, drops it, and keeps its own. */
	rh = 0;
	OK(kvs_seq_create(t.s, 2));
	OK(tl_append(&t, 2, P, 4, &rh));
	OK(kvs_seq_seal(t.s, 2));
	cr_assert_eq(kvs_block_get(t.s, old, &r), -ESTALE);
	OK(kvs_seq_blocks(t.s, 2, 0, &r, 1, &n));
	cr_assert(r.sealed);
	check_bytes(&t, 2, P);
	kvs_store_stats st;
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.csum_failures, 1);
	cr_assert_eq(st.dedups, 0);
	check(&t);
	tl_close(&t);
}

/* Several threads run request lifecycles on one store with shared prompts:
 * whatever they attach or dedupe, every byte they read back is the one
 * their own prefix implies. */
struct conc {
	struct tl *t;
	unsigned id;
	unsigned iters;
	unsigned bad;
	unsigned attached;
};

static void *conc_worker(void *arg)
{
	struct conc *c = arg;
	uint64_t x = 0x9E3779B97F4A7C15ull * (c->id + 1);
	for (unsigned it = 0; it < c->iters; it++) {
		x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
		uint32_t tok[16], n = 9 + (uint32_t)(x % 8);
		for (uint32_t i = 0; i < n; i++) /* a few prompts, random tails */
			tok[i] = i < 8 ? (uint32_t)(x >> 40) % 3 + i : (uint32_t)(x >> (i + 8)) % 2;
		kvs_seq_id id = (kvs_seq_id)c->id << 32 | it;
		if (kvs_seq_create(c->t->s, id)) {
			c->bad++;
			continue;
		}
		uint32_t m = 0;
		if (it % 2) /* the others compute it all, and dedupe when sealing */
			kvs_seq_attach_prefix(c->t->s, id, tok, n, &m);
		c->attached += m;
		uint64_t rh = 0;
		for (uint32_t i = 0; i < m; i++)
			rh = tl_roll(rh, tok[i]);
		int rc = tl_append(c->t, id, tok + m, n - m, &rh);
		if (rc == 0) {
			/* Lock-free matches racing other threads' seals and
			 * evictions still see every block this sequence pins. */
			kvs_seq_info si;
			uint32_t got;
			kvs_seq_get_info(c->t->s, id, &si);
			uint32_t sealed = (uint32_t)(si.n_tokens - si.tail_fill) / TL_BT;
			kvs_store_match(c->t->s, tok, n, &got);
			c->bad += got < sealed || got > n / TL_BT;
		}
		if (rc == 0) {
			kvs_block_ref r[4];
			uint32_t nb;
			kvs_seq_blocks(c->t->s, id, 0, r, 4, &nb);
			rh = 0;
			for (uint32_t p = 0; p < n; p++) {
				rh = tl_roll(rh, tok[p]);
				c->bad += tl_token(r[p / TL_BT].ptr, p % TL_BT, rh, 1) != 0;
			}
		} else if (rc != -ENOSPC) {
			c->bad++;
		}
		if (kvs_seq_release(c->t->s, id))
			c->bad++;
	}
	return NULL;
}

Test(kvstore_store, concurrent_sequences_share_correct_bytes)
{
	struct tl t;
	tl_open(&t, 24, 24, 64);
	struct conc c[4];
	pthread_t th[4];
	for (unsigned i = 0; i < 4; i++) {
		c[i] = (struct conc){.t = &t, .id = i, .iters = 20000};
		cr_assert_eq(pthread_create(&th[i], NULL, conc_worker, &c[i]), 0);
	}
	unsigned attached = 0;
	for (unsigned i = 0; i < 4; i++) {
		pthread_join(th[i], NULL);
		cr_assert_eq(c[i].bad, 0, "thread %u: %u wrong", i, c[i].bad);
		attached += c[i].attached;
	}
	cr_assert(attached > 0, "prefixes were shared");
	check(&t);
	kvs_store_stats st;
	kvs_store_get_stats(t.s, &st);
	cr_assert_eq(st.n_seqs, 0);
	cr_assert(st.dedups > 0);
	tl_close(&t);
}
