/* kvstore: a randomized model-based test. Random operations (create, attach
 * a prefix, append, seal, release, match, evict, move between tiers, remote
 * entries, stale-handle probes) run against the store and a simple model of
 * what it must hold; after every step the store's own invariant check runs
 * (slot ownership, reference counts, prefix index, LRU, counters, checksums)
 * and the touched sequence is compared with the model, bytes included. Every
 * 256 steps all sequences and reference counts are compared.
 *
 *   KVMESH_KVSTORE_OPS   operations (default 1000000)
 *   KVMESH_KVSTORE_SEED  seed (default 1); a failure prints the seed and step */
#include <errno.h>
#include <stdlib.h>

#include "kvstore_testlib.h"

#define MAXS 8        /* live sequences (the table's capacity) */
#define MAXT 32       /* tokens per sequence */
#define MAXB (MAXT / TL_BT)
#define NPROMPTS 8
#define PROMPT_LEN 28
#define RING 64

struct mseq {
	int live;
	kvs_seq_id id;
	uint32_t n;                 /* tokens */
	uint32_t toks[MAXT];
	uint64_t rh[MAXT];          /* running content hash after each token */
	kvs_key keys[MAXB];         /* chain key of each full block */
	uint8_t remote[MAXB];       /* block i is held by another node */
	const uint32_t *plan;       /* the prompt it follows */
};

struct remembered {
	kvs_block_id id;
	kvs_key key;
	unsigned tier;
	kvs_handle slot;
};

struct model {
	struct tl t;
	struct mseq seq[MAXS];
	uint32_t prompts[NPROMPTS][PROMPT_LEN];
	struct remembered ring[RING];
	unsigned ring_n;
	uint64_t rng, step, seed;
	kvs_seq_id next_id;
	const char *op;
	uint64_t n_enospc, n_hits_checked, n_dedup_seen, n_more_attached;
};

#define MC(cond, fmt, ...)                                                                 \
	do {                                                                               \
		if (!(cond))                                                               \
			cr_assert_fail("step %llu op %s seed %llu: " fmt " [log: %s]",     \
				       (unsigned long long)m->step, m->op,                 \
				       (unsigned long long)m->seed, ##__VA_ARGS__,         \
				       m->t.last_log);                                     \
	} while (0)
#define MOK(expr) MC((expr) == 0, "%s failed", #expr)

static uint64_t rnd(struct model *m)
{
	/* xorshift64* */
	m->rng ^= m->rng >> 12;
	m->rng ^= m->rng << 25;
	m->rng ^= m->rng >> 27;
	return m->rng * 2685821657736338717ull;
}

static uint32_t below(struct model *m, uint32_t n)
{
	return (uint32_t)((rnd(m) >> 32) % n);
}

static struct mseq *pick_live(struct model *m)
{
	unsigned live[MAXS], n = 0;
	for (unsigned i = 0; i < MAXS; i++)
		if (m->seq[i].live)
			live[n++] = i;
	return n ? &m->seq[live[below(m, n)]] : NULL;
}

/* Adds tokens to the model sequence (content hashes and keys follow). */
static void model_push(struct model *m, struct mseq *q, const uint32_t *tok, uint32_t k,
		       int remote)
{
	(void)m;
	for (uint32_t i = 0; i < k; i++) {
		uint32_t p = q->n++;
		q->toks[p] = tok[i];
		q->rh[p] = tl_roll(p ? q->rh[p - 1] : 0, tok[i]);
		if ((p + 1) % TL_BT == 0) {
			uint32_t b = p / TL_BT;
			q->keys[b] = kvs_key_chain(b ? q->keys[b - 1] : KVS_KEY_ROOT, TL_MODEL,
						   &q->toks[b * TL_BT], TL_BT);
			q->remote[b] = (uint8_t)remote;
		}
	}
}

static void remember(struct model *m, const kvs_block_ref *r)
{
	m->ring[m->ring_n++ % RING] =
		(struct remembered){.id = r->block, .key = r->key, .tier = r->tier, .slot = r->slot};
}

/* Compares one sequence with the model, bytes included. */
static void check_seq(struct model *m, struct mseq *q)
{
	kvs_seq_info si;
	kvs_block_ref r[MAXB + 1];
	uint32_t n;
	MOK(kvs_seq_get_info(m->t.s, q->id, &si));
	MC(si.n_tokens == q->n, "seq %llu tokens %llu, model %u", (unsigned long long)q->id,
	   (unsigned long long)si.n_tokens, q->n);
	MC(si.n_blocks == (q->n + TL_BT - 1) / TL_BT, "block count");
	MOK(kvs_seq_blocks(m->t.s, q->id, 0, r, MAXB + 1, &n));
	MC(n == si.n_blocks, "listed %u of %u", n, si.n_blocks);
	for (uint32_t b = 0; b < n; b++) {
		int full = (b + 1) * TL_BT <= q->n;
		int last = b + 1 == n;
		if (full && q->remote[b]) {
			MC(r[b].node != KVS_NODE_LOCAL && r[b].block == KVS_BLOCK_NONE, "remote");
			continue;
		}
		MC(r[b].node == KVS_NODE_LOCAL && r[b].ptr, "block %u local", b);
		/* Sealed: every block but a last one that is unfinished, or
		 * finished but not sealed yet (tail_fill == block_tokens). */
		int sealed = !(last && si.tail_fill > 0);
		MC(r[b].sealed == sealed, "block %u sealed=%d want %d", b, r[b].sealed, sealed);
		if (sealed) {
			MC(kvs_key_eq(r[b].key, q->keys[b]), "block %u key", b);
			MC(r[b].refs >= 1, "block %u refs", b);
			if (r[b].refs > 1)
				m->n_dedup_seen++;
			remember(m, &r[b]);
		}
		uint32_t end = full ? (b + 1) * TL_BT : q->n;
		for (uint32_t p = b * TL_BT; p < end; p++)
			MC(tl_token(r[b].ptr, p % TL_BT, q->rh[p], 1) == 0,
			   "seq %llu token %u: wrong bytes in block %u (tier %u)",
			   (unsigned long long)q->id, p, b, r[b].tier);
	}
}

/* References by block id, from the model's view of all sequences. */
static void check_all(struct model *m)
{
	kvs_block_id ids[MAXS * (MAXB + 1)];
	uint32_t cnt[MAXS * (MAXB + 1)], nids = 0, live = 0;
	for (unsigned i = 0; i < MAXS; i++) {
		struct mseq *q = &m->seq[i];
		if (!q->live)
			continue;
		live++;
		check_seq(m, q);
		kvs_block_ref r[MAXB + 1];
		uint32_t n;
		MOK(kvs_seq_blocks(m->t.s, q->id, 0, r, MAXB + 1, &n));
		for (uint32_t b = 0; b < n; b++) {
			if (r[b].node != KVS_NODE_LOCAL)
				continue;
			uint32_t j = 0;
			while (j < nids && ids[j] != r[b].block)
				j++;
			if (j == nids) {
				ids[nids] = r[b].block;
				cnt[nids++] = 0;
			}
			cnt[j]++;
		}
	}
	uint32_t referenced[2] = {0, 0}, tails[2] = {0, 0};
	for (uint32_t j = 0; j < nids; j++) {
		kvs_block_ref r;
		MOK(kvs_block_get(m->t.s, ids[j], &r));
		MC(r.refs == cnt[j], "block %#llx refs %u, model %u", (unsigned long long)ids[j],
		   r.refs, cnt[j]);
		if (r.sealed)
			referenced[r.tier]++;
		else
			tails[r.tier]++;
	}
	kvs_store_stats st;
	kvs_store_get_stats(m->t.s, &st);
	MC(st.n_seqs == live, "live sequences %u, model %u", st.n_seqs, live);
	/* Everything else the store holds is cached and must be evictable. */
	for (unsigned t = 0; t < st.n_tiers; t++)
		MC(st.tier[t].referenced == referenced[t] && st.tier[t].tails == tails[t] &&
			   st.tier[t].evictable == st.tier[t].used - referenced[t] - tails[t],
		   "tier %u: referenced %u tails %u evictable %u, model %u %u", t,
		   st.tier[t].referenced, st.tier[t].tails, st.tier[t].evictable, referenced[t],
		   tails[t]);
}

/* Is key held (sealed, local) by some live sequence, hence unevictable? */
static int pinned(struct model *m, kvs_key k)
{
	for (unsigned i = 0; i < MAXS; i++) {
		struct mseq *q = &m->seq[i];
		if (!q->live)
			continue;
		kvs_seq_info si;
		kvs_seq_get_info(m->t.s, q->id, &si);
		uint32_t sealed = q->n / TL_BT - (si.tail_fill == TL_BT);
		for (uint32_t b = 0; b < sealed; b++)
			if (!q->remote[b] && kvs_key_eq(q->keys[b], k))
				return 1;
	}
	return 0;
}

/* A match of tokens[0..len) after the block keyed `parent` found `got`
 * blocks: it must cover every leading block that live sequences pin, and
 * agree with lookups. */
static void check_match(struct model *m, kvs_key parent, const uint32_t *tokens, uint32_t len,
			uint32_t got)
{
	uint32_t nb = len / TL_BT, must = 0;
	kvs_key k = parent, keys[PROMPT_LEN / TL_BT + 1];
	for (uint32_t b = 0; b < nb; b++) {
		k = kvs_key_chain(k, TL_MODEL, tokens + b * TL_BT, TL_BT);
		keys[b] = k;
	}
	while (must < nb && pinned(m, keys[must]))
		must++;
	MC(got >= must && got <= nb, "matched %u blocks, pinned prefix %u of %u", got, must, nb);
	kvs_block_id id;
	for (uint32_t b = 0; b < got; b++)
		MC(kvs_store_lookup(m->t.s, keys[b], &id) == 0, "matched block %u not found", b);
	if (got < nb)
		MC(kvs_store_lookup(m->t.s, keys[got], &id) == -ENOENT, "match stopped early");
	m->n_hits_checked += got;
}

/* -ENOSPC is only right when no tier has a free or an evictable slot. */
static void check_enospc(struct model *m)
{
	kvs_store_stats st;
	kvs_store_get_stats(m->t.s, &st);
	for (unsigned t = 0; t < st.n_tiers; t++)
		MC(st.tier[t].free == 0 && st.tier[t].evictable == 0,
		   "ENOSPC with tier %u free=%u evictable=%u", t, st.tier[t].free,
		   st.tier[t].evictable);
	m->n_enospc++;
}

static void op_release(struct model *m, struct mseq *q)
{
	m->op = "release";
	MOK(kvs_seq_release(m->t.s, q->id));
	q->live = 0;
}

static void op_create(struct model *m)
{
	m->op = "create";
	struct mseq *q = NULL;
	for (unsigned i = 0; i < MAXS && !q; i++)
		if (!m->seq[i].live)
			q = &m->seq[i];
	if (!q) {
		MC(kvs_seq_create(m->t.s, m->next_id++) == -ENOSPC, "table full");
		return;
	}
	memset(q, 0, sizeof *q);
	q->id = m->next_id++;
	q->plan = m->prompts[below(m, NPROMPTS)];
	MOK(kvs_seq_create(m->t.s, q->id));
	MC(kvs_seq_create(m->t.s, q->id) == -EEXIST, "duplicate id");
	q->live = 1;
	if (below(m, 10) < 7) {
		m->op = "attach";
		uint32_t len = below(m, PROMPT_LEN + 1), got;
		MOK(kvs_seq_attach_prefix(m->t.s, q->id, q->plan, len, &got));
		MC(got % TL_BT == 0, "whole blocks");
		check_match(m, KVS_KEY_ROOT, q->plan, len, got / TL_BT);
		model_push(m, q, q->plan, got, 0);
	}
	check_seq(m, q);
}

static void op_append(struct model *m, struct mseq *q)
{
	m->op = "append";
	if (q->n >= MAXT) {
		op_release(m, q);
		return;
	}
	uint32_t k = 1 + below(m, 2 * TL_BT), tok[2 * TL_BT];
	if (k > MAXT - q->n)
		k = MAXT - q->n;
	for (uint32_t i = 0; i < k; i++) {
		uint32_t p = q->n + i;
		tok[i] = p < PROMPT_LEN && below(m, 16) ? q->plan[p] : 1 + below(m, 3);
	}
	uint32_t done = 0;
	while (done < k) {
		kvs_tail_view v;
		int rc = kvs_seq_append(m->t.s, q->id, tok + done, k - done, &v);
		if (rc == -ENOSPC) {
			check_enospc(m);
			break;
		}
		MC(rc == 0, "append: %s", kvm_strerror(rc));
		MC(v.n_taken >= 1 && v.n_taken <= k - done && v.first == (q->n) % TL_BT,
		   "taken %u first %u", v.n_taken, v.first);
		for (uint32_t i = 0; i < v.n_taken; i++)
			tl_token(v.ptr, v.first + i, tl_roll(q->n ? q->rh[q->n - 1] : 0, tok[done + i]),
				 0),
				model_push(m, q, &tok[done + i], 1, 0);
		done += v.n_taken;
	}
}

static void op_seal(struct model *m, struct mseq *q)
{
	m->op = "seal";
	kvs_seq_info si;
	MOK(kvs_seq_get_info(m->t.s, q->id, &si));
	int rc = kvs_seq_seal(m->t.s, q->id);
	if (si.tail_fill == TL_BT) {
		MC(rc == 0, "seal: %s", kvm_strerror(rc));
		MOK(kvs_seq_get_info(m->t.s, q->id, &si));
		MC(si.tail_fill == 0, "sealed");
	} else {
		MC(rc == -EINVAL, "seal of a tail of %u: %d", si.tail_fill, rc);
	}
}

static void op_match(struct model *m)
{
	m->op = "match";
	const uint32_t *p = m->prompts[below(m, NPROMPTS)];
	uint32_t len = below(m, PROMPT_LEN + 1), got;
	if (below(m, 2)) {
		MOK(kvs_store_match(m->t.s, p, len, &got));
	} else {
		kvs_key keys[PROMPT_LEN / TL_BT], k = KVS_KEY_ROOT;
		for (uint32_t b = 0; b < len / TL_BT; b++)
			keys[b] = k = kvs_key_chain(k, TL_MODEL, p + b * TL_BT, TL_BT);
		MOK(kvs_store_match_keys(m->t.s, keys, len / TL_BT, &got));
	}
	check_match(m, KVS_KEY_ROOT, p, len, got);
}

/* Attaches more of its prompt to a sequence that ends on a block boundary. */
static void op_attach_more(struct model *m, struct mseq *q)
{
	m->op = "attach_more";
	kvs_seq_info si;
	MOK(kvs_seq_get_info(m->t.s, q->id, &si));
	uint32_t got;
	int rc = kvs_seq_attach_prefix(m->t.s, q->id, q->plan, 0, &got);
	if (si.tail_fill) {
		MC(rc == -EBUSY, "attach with a tail: %d", rc);
		return;
	}
	MC(rc == 0 && got == 0, "empty attach");
	if (q->n >= PROMPT_LEN)
		return;
	/* Only a sequence still on its prompt can share more of it. */
	for (uint32_t p = 0; p < q->n; p++)
		if (q->toks[p] != q->plan[p])
			return;
	uint32_t len = below(m, PROMPT_LEN - q->n + 1);
	if (q->n + len > MAXT)
		len = MAXT - q->n;
	kvs_key parent = q->n ? q->keys[q->n / TL_BT - 1] : KVS_KEY_ROOT;
	MOK(kvs_seq_attach_prefix(m->t.s, q->id, q->plan + q->n, len, &got));
	check_match(m, parent, q->plan + q->n, len, got / TL_BT);
	model_push(m, q, q->plan + q->n, got, 0);
	m->n_more_attached += got / TL_BT;
}

static void op_evict(struct model *m)
{
	m->op = "evict";
	kvs_store_stats st;
	kvs_store_get_stats(m->t.s, &st);
	unsigned t = below(m, st.n_tiers);
	uint32_t want = 1 + below(m, 3), got;
	MOK(kvs_store_evict(m->t.s, t, want, &got));
	uint32_t e = st.tier[t].evictable;
	MC(got == (want < e ? want : e), "evicted %u of %u (evictable %u)", got, want, e);
}

/* A random sealed local block of q, or 0. */
static int pick_block(struct model *m, struct mseq *q, kvs_block_ref *out)
{
	kvs_block_ref r[MAXB + 1];
	uint32_t n, c[MAXB + 1], k = 0;
	MOK(kvs_seq_blocks(m->t.s, q->id, 0, r, MAXB + 1, &n));
	for (uint32_t b = 0; b < n; b++)
		if (r[b].node == KVS_NODE_LOCAL && r[b].sealed)
			c[k++] = b;
	if (!k)
		return 0;
	*out = r[c[below(m, k)]];
	return 1;
}

static void op_move(struct model *m, struct mseq *q)
{
	m->op = "move";
	kvs_block_ref r;
	if (!pick_block(m, q, &r))
		return;
	unsigned to = below(m, 2);
	int rc = kvs_block_move(m->t.s, r.block, to);
	if (rc == -ENOSPC) {
		kvs_store_stats st;
		kvs_store_get_stats(m->t.s, &st);
		MC(st.tier[to].free == 0 && st.tier[to].evictable == 0, "move ENOSPC");
		return;
	}
	MC(rc == 0, "move: %s", kvm_strerror(rc));
	MOK(kvs_block_get(m->t.s, r.block, &r));
	MC(r.tier == to, "moved to %u, is on %u", to, r.tier);
	if (r.slot != m->ring[(m->ring_n + RING - 1) % RING].slot)
		remember(m, &r);
}

static void op_verify(struct model *m, struct mseq *q)
{
	m->op = "verify";
	kvs_block_ref r;
	if (pick_block(m, q, &r))
		MOK(kvs_block_verify(m->t.s, r.block));
}

static void op_remote(struct model *m, struct mseq *q)
{
	m->op = "remote";
	kvs_seq_info si;
	MOK(kvs_seq_get_info(m->t.s, q->id, &si));
	if (q->n + TL_BT > MAXT)
		return;
	uint32_t tok[TL_BT];
	for (uint32_t i = 0; i < TL_BT; i++)
		tok[i] = 1 + below(m, 3);
	if (si.tail_fill) {
		MC(kvs_seq_append_remote(m->t.s, q->id, 1, 1, KVS_KEY_ROOT) == -EBUSY,
		   "remote after a tail");
		return;
	}
	kvs_key k = kvs_key_chain(q->n ? q->keys[q->n / TL_BT - 1] : KVS_KEY_ROOT, TL_MODEL, tok,
				  TL_BT);
	int rc = kvs_seq_append_remote(m->t.s, q->id, 1 + below(m, 3), rnd(m), k);
	MC(rc == 0, "remote: %s", kvm_strerror(rc));
	model_push(m, q, tok, TL_BT, 1);
}

/* Old block ids and slot handles either still name the block they named
 * or are refused; they never reach other data. */
static void op_stale(struct model *m)
{
	m->op = "stale";
	unsigned n = m->ring_n < RING ? m->ring_n : RING;
	if (!n)
		return;
	struct remembered *w = &m->ring[below(m, n)];
	kvs_block_ref r;
	int rc = kvs_block_get(m->t.s, w->id, &r);
	MC(rc == 0 || rc == -ESTALE, "get: %d", rc);
	if (rc == 0)
		MC(kvs_key_eq(r.key, w->key), "a live id names another block");
	kvs_arena *a = m->t.arena[w->tier];
	if (kvs_arena_check(a, w->slot) == 0) {
		/* The slot was never released since: the block is still there. */
		kvs_block_id id;
		MOK(kvs_store_lookup(m->t.s, w->key, &id));
		MOK(kvs_block_get(m->t.s, id, &r));
		MC(r.slot == w->slot && r.tier == w->tier, "slot handle outlived its block");
	}
}

static void build_prompts(struct model *m)
{
	for (unsigned i = 0; i < NPROMPTS; i++) {
		uint32_t keep = 0;
		if (i) {
			/* Share a prefix with an earlier prompt: a tree of prompts. */
			keep = below(m, PROMPT_LEN);
			memcpy(m->prompts[i], m->prompts[below(m, i)], keep * sizeof(uint32_t));
		}
		for (uint32_t p = keep; p < PROMPT_LEN; p++)
			m->prompts[i][p] = 1 + below(m, 3);
	}
}

static uint64_t env_u64(const char *name, uint64_t dflt)
{
	const char *v = getenv(name);
	return v && *v ? strtoull(v, NULL, 0) : dflt;
}

Test(kvstore_model, random_operations_against_a_model, .timeout = 600)
{
	static struct model mm;
	struct model *m = &mm;
	memset(m, 0, sizeof *m);
	uint64_t ops = env_u64("KVMESH_KVSTORE_OPS", 1000000);
	m->seed = env_u64("KVMESH_KVSTORE_SEED", 1);
	m->rng = m->seed * 0x9E3779B97F4A7C15ull + 1;
	m->next_id = 1;
	m->op = "open";
	/* 6 fast and 10 slow slots for up to 8 sequences of up to 8 blocks:
	 * the store is under pressure all the time. */
	tl_open(&m->t, 6, 10, MAXS);
	build_prompts(m);
	for (m->step = 0; m->step < ops; m->step++) {
		uint32_t x = below(m, 100);
		struct mseq *q = pick_live(m);
		if (!q || x < 14)
			op_create(m);
		else if (x < 44)
			op_append(m, q);
		else if (x < 49)
			op_seal(m, q);
		else if (x < 60)
			op_release(m, q);
		else if (x < 70)
			op_match(m);
		else if (x < 73)
			op_evict(m);
		else if (x < 81)
			op_move(m, q);
		else if (x < 83)
			op_verify(m, q);
		else if (x < 85)
			op_attach_more(m, q);
		else if (x < 89)
			op_remote(m, q);
		else
			op_stale(m);
		int rc = kvs_store_check(m->t.s, KVS_CHECK_CSUM);
		MC(rc == 0, "invariants broken");
		if (q && q->live)
			check_seq(m, q);
		if (m->step % 256 == 0)
			check_all(m);
		kvs_store_stats st;
		kvs_store_get_stats(m->t.s, &st);
		for (unsigned t = 0; t < st.n_tiers; t++)
			MC(st.tier[t].used + st.tier[t].free == st.tier[t].capacity &&
				   st.tier[t].tails + st.tier[t].referenced + st.tier[t].evictable ==
					   st.tier[t].used,
			   "tier %u accounting", t);
	}
	check_all(m);
	kvs_store_stats st;
	kvs_store_get_stats(m->t.s, &st);
	/* The run must have exercised what it claims to test. */
	cr_log_info("ops=%llu seals=%llu dedups=%llu hits=%llu misses=%llu evictions=%llu "
		    "demotions=%llu promotions=%llu moves=%llu enospc=%llu",
		    (unsigned long long)ops, (unsigned long long)st.seals,
		    (unsigned long long)st.dedups, (unsigned long long)st.hits,
		    (unsigned long long)st.misses, (unsigned long long)st.evictions,
		    (unsigned long long)st.demotions, (unsigned long long)st.promotions,
		    (unsigned long long)st.moves, (unsigned long long)st.enospc);
	if (ops >= 100000) {
		cr_assert(st.dedups > 0 && st.hits > 0 && st.misses > 0 && st.evictions > 0);
		cr_assert(st.demotions > 0 && st.promotions > 0 && st.enospc > 0);
		cr_assert(m->n_dedup_seen > 0 && m->n_more_attached > 0);
	}
	tl_close(&m->t);
}
