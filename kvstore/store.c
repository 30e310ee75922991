/* The block store. Locking: public kvs_* functions take s->mu and call
 * static do_* / helper functions, which assume it is held. The one
 * exception is prefix matching (match_run), a seqlock reader of the index
 * that falls back to the lock. */
#include "kvstore/store.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore/index.h"

#define NIL UINT32_MAX

/* LOOSE: a full block stored unkeyed by kvs_block_put: pinned, never in
 * the index or the LRU list, freed by its last unpin. */
enum { BLK_FREE = 0, BLK_TAIL = 1, BLK_FULL = 2, BLK_LOOSE = 3 };

/* One block record: 56 bytes. The key must stay first (the index reads it). */
struct blk {
	kvs_key key;     /* FULL: the index key; zero otherwise */
	uint64_t csum;   /* FULL: XXH3-64 of the bytes */
	kvs_handle slot; /* in tiers[tier] */
	uint32_t refs;   /* sequences listing it (a tail: 1, its owner) */
	uint32_t gen;    /* odd while live; kvs_block_id's upper half */
	uint32_t prev;   /* LRU links while FULL and unreferenced; */
	uint32_t next;   /* next doubles as the free-list link */
	uint8_t tier;
	uint8_t state;
	uint8_t in_lru;
	uint8_t pad_;
};

/* One entry of a sequence's block list: 16 bytes. */
struct seq_ent {
	uint64_t ref;  /* local: kvs_block_id; remote: the holder's id */
	uint32_t node; /* KVS_NODE_LOCAL or the holder */
	uint32_t rec;  /* local: record number; remote: NIL */
};

struct seq {
	kvs_seq_id id;
	struct seq_ent *ents;
	uint32_t n_ents, cap_ents;
	uint32_t tail;      /* record of the tail, or NIL */
	uint32_t tail_fill; /* tokens in the tail */
	uint32_t *tail_tokens;
	uint64_t n_tokens;
	kvs_key last_key;
};

struct tier {
	kvs_arena *arena;
	uint32_t capacity;
	uint32_t used;
	uint32_t tails;
	uint32_t n_lru;
	uint32_t lru_head; /* most recently used */
	uint32_t lru_tail; /* least recently used: the next victim */
};

struct kvs_store {
	pthread_mutex_t mu;
	kvs_geom geom;
	size_t block_bytes;
	uint64_t model;
	unsigned n_tiers;
	struct tier tiers[KVS_MAX_TIERS];

	struct blk *blks;
	uint32_t *pins;    /* per record: kvs_block_put pins (part of refs) */
	uint32_t n_recs;   /* capacity: one record per slot of every tier */
	uint32_t rec_free; /* free-list head */
	struct kvs_index index;

	struct seq **seq_tab; /* open addressing by id, NULL = empty */
	uint32_t seq_mask;
	uint32_t n_seqs, max_seqs;
	size_t seq_bytes; /* live sequences' structs, entry arrays, token buffers */

	/* Prefix-index counters: also bumped by lock-free matches. */
	_Atomic uint64_t hits, misses;
	uint64_t seals, dedups, evictions, demotions, promotions, moves,
		csum_failures, enospc, puts;
	uint32_t n_pins; /* pins held, over all records */

	void (*log)(void *arg, const char *line);
	void *log_arg;
};

/* ---- helpers ---------------------------------------------------------------- */

__attribute__((format(printf, 2, 3))) static void slog(kvs_store *s, const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	if (s->log)
		s->log(s->log_arg, line);
	else
		fprintf(stderr, "%s\n", line);
}

static inline void count(_Atomic uint64_t *c, uint64_t n)
{
	if (n)
		atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

static inline kvs_block_id blk_id(const kvs_store *s, uint32_t rec)
{
	return (kvs_block_id)s->blks[rec].gen << 32 | rec;
}

/* The record named by id, or NIL if the id is stale. */
static uint32_t blk_resolve(const kvs_store *s, kvs_block_id id)
{
	uint32_t rec = (uint32_t)id, gen = (uint32_t)(id >> 32);
	if (rec >= s->n_recs || !(gen & 1) || s->blks[rec].gen != gen ||
	    s->blks[rec].state == BLK_FREE)
		return NIL;
	return rec;
}

static uint32_t rec_new(kvs_store *s, unsigned tier, kvs_handle slot, int state)
{
	uint32_t r = s->rec_free;
	/* Records never run out: there is one per slot, and each live record
	 * holds at least one slot. */
	struct blk *b = &s->blks[r];
	s->rec_free = b->next;
	b->gen++;
	b->key = KVS_KEY_ROOT;
	b->csum = 0;
	b->slot = slot;
	b->refs = 1;
	b->prev = b->next = NIL;
	b->tier = (uint8_t)tier;
	b->state = (uint8_t)state;
	b->in_lru = 0;
	return r;
}

/* Frees a record and its slot. The record must be out of the LRU list and
 * the index. */
static void rec_drop(kvs_store *s, uint32_t r)
{
	struct blk *b = &s->blks[r];
	struct tier *t = &s->tiers[b->tier];
	kvs_arena_free(t->arena, b->slot);
	t->used--;
	if (b->state == BLK_TAIL)
		t->tails--;
	b->gen++;
	b->state = BLK_FREE;
	b->refs = 0;
	s->pins[r] = 0;
	b->slot = KVS_HANDLE_NONE;
	b->next = s->rec_free;
	s->rec_free = r;
}

static void lru_remove(kvs_store *s, uint32_t r)
{
	struct blk *b = &s->blks[r];
	struct tier *t = &s->tiers[b->tier];
	if (!b->in_lru)
		return;
	if (b->prev != NIL)
		s->blks[b->prev].next = b->next;
	else
		t->lru_head = b->next;
	if (b->next != NIL)
		s->blks[b->next].prev = b->prev;
	else
		t->lru_tail = b->prev;
	b->prev = b->next = NIL;
	b->in_lru = 0;
	t->n_lru--;
}

static void lru_push_front(kvs_store *s, uint32_t r)
{
	struct blk *b = &s->blks[r];
	struct tier *t = &s->tiers[b->tier];
	b->prev = NIL;
	b->next = t->lru_head;
	if (t->lru_head != NIL)
		s->blks[t->lru_head].prev = r;
	else
		t->lru_tail = r;
	t->lru_head = r;
	b->in_lru = 1;
	t->n_lru++;
}

/* Drops an unreferenced full block from the cache. */
static void evict(kvs_store *s, uint32_t r)
{
	lru_remove(s, r);
	kvs_index_remove(&s->index, s->blks[r].key, r);
	rec_drop(s, r);
	s->evictions++;
}

static int slot_get(kvs_store *s, unsigned tier, kvs_handle *out);

/* Verifies a full block's checksum. 0, -EIO (mismatch, logged), or the
 * arena's error. */
static int verify(kvs_store *s, uint32_t r)
{
	struct blk *b = &s->blks[r];
	uint64_t c;
	int rc = kvs_arena_checksum(s->tiers[b->tier].arena, b->slot, &c);
	if (rc)
		return rc;
	if (c != b->csum) {
		s->csum_failures++;
		slog(s,
		     "level=error event=kvstore_checksum_mismatch block=%#llx tier=%u "
		     "want=%016llx got=%016llx",
		     (unsigned long long)blk_id(s, r), b->tier, (unsigned long long)b->csum,
		     (unsigned long long)c);
		return -EIO;
	}
	return 0;
}

/* Moves record r (out of every LRU list) to tier dst, checking its checksum
 * before and after when it is full. */
static int move_rec(kvs_store *s, uint32_t r, unsigned dst)
{
	struct blk *b = &s->blks[r];
	int rc;
	int sealed = b->state == BLK_FULL || b->state == BLK_LOOSE;
	if (sealed && (rc = verify(s, r)))
		return rc;
	kvs_handle h;
	if ((rc = slot_get(s, dst, &h)))
		return rc;
	struct tier *from = &s->tiers[b->tier], *to = &s->tiers[dst];
	to->used++;
	rc = kvs_arena_copy(to->arena, h, from->arena, b->slot);
	if (!rc && sealed) {
		uint64_t c;
		rc = kvs_arena_checksum(to->arena, h, &c);
		if (!rc && c != b->csum) {
			s->csum_failures++;
			slog(s, "level=error event=kvstore_copy_corrupt block=%#llx from=%u to=%u",
			     (unsigned long long)blk_id(s, r), b->tier, dst);
			rc = -EIO;
		}
	}
	if (rc) {
		kvs_arena_free(to->arena, h);
		to->used--;
		return rc;
	}
	kvs_arena_free(from->arena, b->slot);
	from->used--;
	if (b->state == BLK_TAIL) {
		from->tails--;
		to->tails++;
	}
	b->slot = h;
	b->tier = (uint8_t)dst;
	s->moves++;
	return 0;
}

/* Gets a free slot of `tier`, making room when needed: the tier's least
 * recently used unreferenced block moves one tier down if it can, else it
 * is dropped. The caller accounts the slot (tiers[tier].used). */
static int slot_get(kvs_store *s, unsigned tier, kvs_handle *out)
{
	struct tier *t = &s->tiers[tier];
	for (;;) {
		if (kvs_arena_alloc(t->arena, out) == 0)
			return 0;
		uint32_t v = t->lru_tail;
		if (v == NIL)
			return -ENOSPC;
		lru_remove(s, v);
		if (tier + 1 < s->n_tiers) {
			int rc = move_rec(s, v, tier + 1);
			if (rc == 0) {
				s->demotions++;
				lru_push_front(s, v);
				continue;
			}
			/* Nowhere to go (or corrupt): drop it. */
		}
		kvs_index_remove(&s->index, s->blks[v].key, v);
		rec_drop(s, v);
		s->evictions++;
	}
}

/* A sequence takes a reference to full block r. A block nobody held leaves
 * the LRU list and, if it sits in a slower tier, moves back up (promotion
 * on use); a block that fails its checksum then is dropped and -EIO
 * returned. Blocks already held stay where they are: their holders may be
 * reading them. */
static int blk_take(kvs_store *s, uint32_t r)
{
	struct blk *b = &s->blks[r];
	if (b->refs == 0) {
		lru_remove(s, r);
		if (b->tier > 0) {
			int rc = move_rec(s, r, 0);
			if (rc == 0) {
				s->promotions++;
			} else if (rc == -EIO) {
				kvs_index_remove(&s->index, b->key, r);
				rec_drop(s, r);
				s->evictions++;
				return -EIO;
			}
			/* -ENOSPC: stays in the slow tier, still usable. */
		}
	}
	b->refs++;
	return 0;
}

static void blk_put(kvs_store *s, uint32_t r)
{
	struct blk *b = &s->blks[r];
	if (--b->refs == 0)
		lru_push_front(s, r);
}

/* ---- the sequence table ------------------------------------------------------ */

static inline uint32_t seq_hash(const kvs_store *s, kvs_seq_id id)
{
	return (uint32_t)((id * 0x9E3779B97F4A7C15ull) >> 32) & s->seq_mask;
}

static uint32_t seq_pos(const kvs_store *s, kvs_seq_id id)
{
	uint32_t i = seq_hash(s, id);
	while (s->seq_tab[i] && s->seq_tab[i]->id != id)
		i = (i + 1) & s->seq_mask;
	return i;
}

static struct seq *seq_find(const kvs_store *s, kvs_seq_id id)
{
	return s->seq_tab[seq_pos(s, id)];
}

static void seq_tab_remove(kvs_store *s, kvs_seq_id id)
{
	uint32_t i = seq_pos(s, id), m = s->seq_mask;
	for (uint32_t j = (i + 1) & m; s->seq_tab[j]; j = (j + 1) & m) {
		uint32_t home = seq_hash(s, s->seq_tab[j]->id);
		if (((j - home) & m) >= ((j - i) & m)) {
			s->seq_tab[i] = s->seq_tab[j];
			i = j;
		}
	}
	s->seq_tab[i] = NULL;
	s->n_seqs--;
}

static int seq_reserve(kvs_store *s, struct seq *q, uint32_t more)
{
	if (q->n_ents + more <= q->cap_ents)
		return 0;
	uint32_t cap = q->cap_ents ? q->cap_ents : 8;
	while (cap < q->n_ents + more)
		cap *= 2;
	struct seq_ent *e = realloc(q->ents, (size_t)cap * sizeof *e);
	if (!e)
		return -ENOMEM;
	s->seq_bytes += (size_t)(cap - q->cap_ents) * sizeof *e;
	q->ents = e;
	q->cap_ents = cap;
	return 0;
}

static void seq_push_local(kvs_store *s, struct seq *q, uint32_t r)
{
	q->ents[q->n_ents++] = (struct seq_ent){blk_id(s, r), KVS_NODE_LOCAL, r};
}

/* ---- create / destroy ---------------------------------------------------------- */

int kvs_store_create(const kvs_store_config *c, kvs_store **out)
{
	if (!c || !out || kvs_geom_check(&c->geom) || !c->tiers[0] || c->max_seqs == 0 ||
	    c->max_seqs > (1u << 28))
		return -EINVAL;
	size_t bb = kvs_geom_block_bytes(&c->geom);
	uint64_t total = 0;
	unsigned n_tiers = 0;
	for (unsigned t = 0; t < KVS_MAX_TIERS && c->tiers[t]; t++) {
		kvs_arena_info ai;
		kvs_arena_get_info(c->tiers[t], &ai);
		if (ai.slot_bytes != bb)
			return -EINVAL;
		total += ai.n_slots;
		n_tiers++;
	}
	if (total >= NIL || c->tiers[0] == c->tiers[1])
		return -EINVAL;

	kvs_store *s = calloc(1, sizeof *s);
	if (!s)
		return -ENOMEM;
	s->geom = c->geom;
	s->block_bytes = bb;
	s->model = c->model;
	s->n_tiers = n_tiers;
	s->max_seqs = c->max_seqs;
	s->log = c->log;
	s->log_arg = c->log_arg;
	for (unsigned t = 0; t < n_tiers; t++) {
		kvs_arena_info ai;
		kvs_arena_get_info(c->tiers[t], &ai);
		s->tiers[t] = (struct tier){.arena = c->tiers[t], .capacity = ai.n_slots,
					    .lru_head = NIL, .lru_tail = NIL};
	}
	s->n_recs = (uint32_t)total;
	s->blks = calloc(total, sizeof *s->blks);
	s->pins = calloc(total, sizeof *s->pins);
	uint32_t seq_cap = 16;
	while (seq_cap < 2 * c->max_seqs)
		seq_cap <<= 1;
	s->seq_tab = calloc(seq_cap, sizeof *s->seq_tab);
	s->seq_mask = seq_cap - 1;
	int rc = -ENOMEM;
	if (!s->blks || !s->pins || !s->seq_tab)
		goto fail;
	for (uint32_t r = 0; r < s->n_recs; r++)
		s->blks[r].next = r + 1 < s->n_recs ? r + 1 : NIL;
	s->rec_free = 0;
	if ((rc = kvs_index_init(&s->index, s->n_recs, s->blks, sizeof *s->blks)))
		goto fail;
	if ((rc = pthread_mutex_init(&s->mu, NULL))) {
		kvs_index_fini(&s->index);
		rc = -rc;
		goto fail;
	}
	*out = s;
	return 0;
fail:
	free(s->seq_tab);
	free(s->pins);
	free(s->blks);
	free(s);
	return rc;
}

static void seq_free(kvs_store *s, struct seq *q)
{
	for (uint32_t i = 0; i < q->n_ents; i++)
		if (q->ents[i].rec != NIL)
			blk_put(s, q->ents[i].rec);
	if (q->tail != NIL)
		rec_drop(s, q->tail);
	s->seq_bytes -= sizeof *q + (size_t)q->cap_ents * sizeof *q->ents +
			(q->tail_tokens ? (size_t)s->geom.block_tokens * sizeof(uint32_t) : 0);
	free(q->ents);
	free(q->tail_tokens);
	free(q);
}

void kvs_store_destroy(kvs_store *s)
{
	if (!s)
		return;
	for (uint32_t i = 0; i <= s->seq_mask; i++)
		if (s->seq_tab[i])
			seq_free(s, s->seq_tab[i]);
	for (uint32_t r = 0; r < s->n_recs; r++)
		if (s->blks[r].state != BLK_FREE)
			kvs_arena_free(s->tiers[s->blks[r].tier].arena, s->blks[r].slot);
	kvs_index_fini(&s->index);
	pthread_mutex_destroy(&s->mu);
	free(s->seq_tab);
	free(s->pins);
	free(s->blks);
	free(s);
}

/* ---- sequences ---------------------------------------------------------------- */

int kvs_seq_create(kvs_store *s, kvs_seq_id id)
{
	int rc = 0;
	pthread_mutex_lock(&s->mu);
	uint32_t i = seq_pos(s, id);
	if (s->seq_tab[i]) {
		rc = -EEXIST;
	} else if (s->n_seqs >= s->max_seqs) {
		rc = -ENOSPC;
		s->enospc++;
		slog(s, "level=warn event=kvstore_seq_table_full seq=%llu max_seqs=%u",
		     (unsigned long long)id, s->max_seqs);
	} else {
		struct seq *q = calloc(1, sizeof *q);
		if (!q) {
			rc = -ENOMEM;
		} else {
			q->id = id;
			q->tail = NIL;
			s->seq_bytes += sizeof *q;
			s->seq_tab[i] = q;
			s->n_seqs++;
		}
	}
	pthread_mutex_unlock(&s->mu);
	return rc;
}

int kvs_seq_release(kvs_store *s, kvs_seq_id id)
{
	pthread_mutex_lock(&s->mu);
	struct seq *q = seq_find(s, id);
	if (q) {
		seq_tab_remove(s, id);
		seq_free(s, q);
	}
	pthread_mutex_unlock(&s->mu);
	return q ? 0 : -ENOENT;
}

static int do_attach(kvs_store *s, struct seq *q, const uint32_t *tokens, uint32_t n,
		     uint32_t *n_matched)
{
	uint32_t bt = s->geom.block_tokens, nb = n / bt, got = 0;
	int rc = 0;
	if (q->tail != NIL)
		return -EBUSY;
	for (; got < nb; got++) {
		if ((rc = seq_reserve(s, q, 1)))
			break; /* keeps what was attached; *n_matched says how much */
		kvs_key k = kvs_key_chain(q->last_key, s->model, tokens + (size_t)got * bt, bt);
		uint32_t r = kvs_index_find(&s->index, k);
		if (r == NIL) {
			count(&s->misses, 1);
			break;
		}
		count(&s->hits, 1);
		if (blk_take(s, r)) /* corrupt: dropped; the match ends here */
			break;
		seq_push_local(s, q, r);
		q->last_key = k;
		q->n_tokens += bt;
	}
	*n_matched = got * bt;
	return rc;
}

int kvs_seq_attach_prefix(kvs_store *s, kvs_seq_id id, const uint32_t *tokens, uint32_t n,
			  uint32_t *n_matched)
{
	if (!n_matched || (n && !tokens))
		return -EINVAL;
	pthread_mutex_lock(&s->mu);
	struct seq *q = seq_find(s, id);
	int rc = q ? do_attach(s, q, tokens, n, n_matched) : -ENOENT;
	pthread_mutex_unlock(&s->mu);
	return rc;
}

static int do_seal(kvs_store *s, struct seq *q)
{
	uint32_t bt = s->geom.block_tokens;
	if (q->tail == NIL || q->tail_fill != bt)
		return -EINVAL;
	int rc = seq_reserve(s, q, 1);
	if (rc)
		return rc;
	uint32_t r = q->tail;
	struct blk *b = &s->blks[r];
	kvs_key k = kvs_key_chain(q->last_key, s->model, q->tail_tokens, bt);
	uint64_t c;
	if ((rc = kvs_arena_checksum(s->tiers[b->tier].arena, b->slot, &c)))
		return rc;
	uint32_t dup = kvs_index_find(&s->index, k);
	/* Same key, same prefix: share the stored block and free ours. If the
	 * stored copy turns out corrupt on the way (blk_take drops it), ours
	 * takes its place instead. */
	if (dup != NIL && blk_take(s, dup) == 0) {
		rec_drop(s, r);
		seq_push_local(s, q, dup);
		s->dedups++;
	} else {
		b->key = k;
		b->csum = c;
		b->state = BLK_FULL;
		s->tiers[b->tier].tails--;
		kvs_index_insert(&s->index, k, r); /* cannot fail: one entry per record */
		seq_push_local(s, q, r);
	}
	q->last_key = k;
	q->tail = NIL;
	q->tail_fill = 0;
	s->seals++;
	return 0;
}

int kvs_seq_seal(kvs_store *s, kvs_seq_id id)
{
	pthread_mutex_lock(&s->mu);
	struct seq *q = seq_find(s, id);
	int rc = q ? do_seal(s, q) : -ENOENT;
	pthread_mutex_unlock(&s->mu);
	return rc;
}

static void log_full(kvs_store *s, const char *op, kvs_seq_id id)
{
	char buf[384];
	size_t o = 0;
	for (unsigned t = 0; t < s->n_tiers && o < sizeof buf; t++) {
		struct tier *ti = &s->tiers[t];
		o += (size_t)snprintf(buf + o, sizeof buf - o,
				      " tier%u_capacity=%u tier%u_tails=%u tier%u_referenced=%u", t,
				      ti->capacity, t, ti->tails, t, ti->used - ti->tails - ti->n_lru);
	}
	slog(s,
	     "level=warn event=kvstore_full op=%s seq=%llu%s msg=\"every slot holds a tail or a "
	     "referenced block; nothing evictable\"",
	     op, (unsigned long long)id, buf);
}

static int do_append(kvs_store *s, struct seq *q, const uint32_t *tokens, uint32_t n,
		     kvs_tail_view *out)
{
	uint32_t bt = s->geom.block_tokens;
	int rc;
	if (q->tail != NIL && q->tail_fill == bt && (rc = do_seal(s, q)))
		return rc;
	if (q->tail == NIL) {
		if (!q->tail_tokens) {
			if (!(q->tail_tokens = malloc((size_t)bt * sizeof(uint32_t))))
				return -ENOMEM;
			s->seq_bytes += (size_t)bt * sizeof(uint32_t);
		}
		/* The fast tier first (making room there by demotion), then the
		 * slower ones. */
		kvs_handle h;
		unsigned t = 0;
		while ((rc = slot_get(s, t, &h)) == -ENOSPC && t + 1 < s->n_tiers)
			t++;
		if (rc) {
			if (rc == -ENOSPC) {
				s->enospc++;
				log_full(s, "append", q->id);
			}
			return rc;
		}
		s->tiers[t].used++;
		s->tiers[t].tails++;
		q->tail = rec_new(s, t, h, BLK_TAIL);
		q->tail_fill = 0;
	}
	uint32_t take = bt - q->tail_fill < n ? bt - q->tail_fill : n;
	memcpy(q->tail_tokens + q->tail_fill, tokens, (size_t)take * sizeof(uint32_t));
	struct blk *b = &s->blks[q->tail];
	out->block = blk_id(s, q->tail);
	out->tier = b->tier;
	out->slot = b->slot;
	kvs_arena_ptr(s->tiers[b->tier].arena, b->slot, &out->ptr);
	out->first = q->tail_fill;
	out->n_taken = take;
	q->tail_fill += take;
	q->n_tokens += take;
	return 0;
}

int kvs_seq_append(kvs_store *s, kvs_seq_id id, const uint32_t *tokens, uint32_t n,
		   kvs_tail_view *out)
{
	if (n == 0 || !tokens || !out)
		return -EINVAL;
	pthread_mutex_lock(&s->mu);
	struct seq *q = seq_find(s, id);
	int rc = q ? do_append(s, q, tokens, n, out) : -ENOENT;
	pthread_mutex_unlock(&s->mu);
	return rc;
}

int kvs_seq_append_remote(kvs_store *s, kvs_seq_id id, uint32_t node, uint64_t remote_block,
			  kvs_key key)
{
	if (node == KVS_NODE_LOCAL)
		return -EINVAL;
	pthread_mutex_lock(&s->mu);
	struct seq *q = seq_find(s, id);
	int rc = !q ? -ENOENT : q->tail != NIL ? -EBUSY : seq_reserve(s, q, 1);
	if (rc == 0) {
		q->ents[q->n_ents++] = (struct seq_ent){remote_block, node, NIL};
		q->last_key = key;
		q->n_tokens += s->geom.block_tokens;
	}
	pthread_mutex_unlock(&s->mu);
	return rc;
}

int kvs_seq_get_info(kvs_store *s, kvs_seq_id id, kvs_seq_info *out)
{
	pthread_mutex_lock(&s->mu);
	struct seq *q = seq_find(s, id);
	if (q) {
		out->n_tokens = q->n_tokens;
		out->n_blocks = q->n_ents + (q->tail != NIL);
		out->tail_fill = q->tail != NIL ? q->tail_fill : 0;
		out->last_key = q->last_key;
	}
	pthread_mutex_unlock(&s->mu);
	return q ? 0 : -ENOENT;
}

static void fill_ref(kvs_store *s, uint32_t r, kvs_block_ref *o)
{
	struct blk *b = &s->blks[r];
	memset(o, 0, sizeof *o);
	o->block = blk_id(s, r);
	o->node = KVS_NODE_LOCAL;
	o->tier = b->tier;
	o->slot = b->slot;
	kvs_arena_ptr(s->tiers[b->tier].arena, b->slot, &o->ptr);
	o->key = b->key;
	o->refs = b->refs;
	o->sealed = b->state == BLK_FULL || b->state == BLK_LOOSE;
}

int kvs_seq_blocks(kvs_store *s, kvs_seq_id id, uint32_t first, kvs_block_ref *out, uint32_t cap,
		   uint32_t *n_out)
{
	if (!n_out || (cap && !out))
		return -EINVAL;
	pthread_mutex_lock(&s->mu);
	struct seq *q = seq_find(s, id);
	if (q) {
		uint32_t total = q->n_ents + (q->tail != NIL), n = 0;
		for (uint32_t i = first; i < total && n < cap; i++, n++) {
			if (i == q->n_ents) {
				fill_ref(s, q->tail, &out[n]);
			} else if (q->ents[i].rec != NIL) {
				fill_ref(s, q->ents[i].rec, &out[n]);
			} else {
				memset(&out[n], 0, sizeof out[n]);
				out[n].node = q->ents[i].node;
				out[n].remote = q->ents[i].ref;
				out[n].sealed = 1;
			}
		}
		*n_out = n;
	}
	pthread_mutex_unlock(&s->mu);
	return q ? 0 : -ENOENT;
}

/* ---- blocks -------------------------------------------------------------------- */

int kvs_block_get(kvs_store *s, kvs_block_id id, kvs_block_ref *out)
{
	pthread_mutex_lock(&s->mu);
	uint32_t r = blk_resolve(s, id);
	if (r != NIL)
		fill_ref(s, r, out);
	pthread_mutex_unlock(&s->mu);
	return r != NIL ? 0 : -ESTALE;
}

int kvs_block_verify(kvs_store *s, kvs_block_id id)
{
	int rc;
	pthread_mutex_lock(&s->mu);
	uint32_t r = blk_resolve(s, id);
	if (r == NIL) {
		rc = -ESTALE;
	} else if (s->blks[r].state == BLK_TAIL) {
		rc = -EBUSY;
	} else {
		rc = verify(s, r);
		if (rc == -EIO && s->blks[r].refs == 0)
			evict(s, r);
	}
	pthread_mutex_unlock(&s->mu);
	return rc;
}

int kvs_block_move(kvs_store *s, kvs_block_id id, unsigned tier)
{
	int rc;
	pthread_mutex_lock(&s->mu);
	uint32_t r = blk_resolve(s, id);
	if (r == NIL) {
		rc = -ESTALE;
	} else if (tier >= s->n_tiers) {
		rc = -EINVAL;
	} else if (s->blks[r].state == BLK_TAIL) {
		rc = -EBUSY;
	} else if (s->blks[r].tier == tier) {
		rc = 0;
	} else {
		/* Out of the LRU list while it moves, so making room in the
		 * destination cannot pick it as a victim. */
		int was_lru = s->blks[r].in_lru;
		lru_remove(s, r);
		rc = move_rec(s, r, tier);
		if (rc == -EIO && was_lru) {
			kvs_index_remove(&s->index, s->blks[r].key, r);
			rec_drop(s, r);
			s->evictions++;
		} else if (was_lru) {
			lru_push_front(s, r);
		}
	}
	pthread_mutex_unlock(&s->mu);
	return rc;
}

/* Takes a fresh slot for a block: the fastest tier with room (making room
 * there by demotion or eviction of unreferenced blocks), then slower ones. */
static int slot_any(kvs_store *s, unsigned *tier, kvs_handle *h)
{
	int rc;
	unsigned t = 0;
	while ((rc = slot_get(s, t, h)) == -ENOSPC && t + 1 < s->n_tiers)
		t++;
	*tier = t;
	return rc;
}

static int do_block_put(kvs_store *s, const kvs_key *key, const void *bytes, kvs_block_ref *out)
{
	if (key) {
		uint32_t dup = kvs_index_find(&s->index, *key);
		/* The same key is the same content: pin the stored copy. One that
		 * fails its checksum on the way is dropped, and ours is stored. */
		if (dup != NIL && blk_take(s, dup) == 0) {
			s->pins[dup]++;
			s->n_pins++;
			s->dedups++;
			fill_ref(s, dup, out);
			return 0;
		}
	}
	kvs_handle h;
	unsigned t;
	int rc = slot_any(s, &t, &h);
	if (rc) {
		if (rc == -ENOSPC) {
			s->enospc++;
			log_full(s, "block_put", 0);
		}
		return rc;
	}
	struct tier *ti = &s->tiers[t];
	uint64_t c;
	if ((rc = kvs_arena_write(ti->arena, h, 0, bytes, s->block_bytes)) ||
	    (rc = kvs_arena_checksum(ti->arena, h, &c))) {
		kvs_arena_free(ti->arena, h);
		return rc;
	}
	ti->used++;
	uint32_t r = rec_new(s, t, h, key ? BLK_FULL : BLK_LOOSE);
	struct blk *b = &s->blks[r];
	b->csum = c;
	if (key) {
		b->key = *key;
		kvs_index_insert(&s->index, *key, r); /* cannot fail: one entry per record */
	}
	s->pins[r] = 1;
	s->n_pins++;
	s->puts++;
	fill_ref(s, r, out);
	return 0;
}

int kvs_block_put(kvs_store *s, const kvs_key *key, const void *bytes, kvs_block_ref *out)
{
	if (!bytes || !out)
		return -EINVAL;
	pthread_mutex_lock(&s->mu);
	int rc = do_block_put(s, key, bytes, out);
	pthread_mutex_unlock(&s->mu);
	return rc;
}

int kvs_block_unpin(kvs_store *s, kvs_block_id id)
{
	int rc = 0;
	pthread_mutex_lock(&s->mu);
	uint32_t r = blk_resolve(s, id);
	if (r == NIL) {
		rc = -ESTALE;
	} else if (s->pins[r] == 0) {
		rc = -EINVAL;
	} else {
		s->pins[r]--;
		s->n_pins--;
		if (s->blks[r].state == BLK_LOOSE) {
			if (--s->blks[r].refs == 0)
				rec_drop(s, r);
		} else {
			blk_put(s, r); /* keyed: stays cached, evictable once unreferenced */
		}
	}
	pthread_mutex_unlock(&s->mu);
	return rc;
}

/* ---- prefix index ---------------------------------------------------------------- */

/* How many of keys[0..n) (n <= 16) are stored, as a prefix. Lock-free as a
 * seqlock reader when no writer interferes (a few tries), else under the
 * lock. Counts hits and misses. */
static uint32_t match_run(kvs_store *s, const kvs_key *keys, uint32_t n)
{
	uint32_t i = 0;
	for (int tries = 0; tries < 4; tries++) {
		uint64_t v = kvs_index_read_begin(&s->index);
		if (v & 1)
			continue;
		for (i = 0; i < n && kvs_index_probe(&s->index, keys[i]) != NIL; i++)
			;
		if (kvs_index_read_ok(&s->index, v))
			goto done;
	}
	pthread_mutex_lock(&s->mu);
	for (i = 0; i < n && kvs_index_probe(&s->index, keys[i]) != NIL; i++)
		;
	pthread_mutex_unlock(&s->mu);
done:
	count(&s->hits, i);
	count(&s->misses, i < n);
	return i;
}

int kvs_store_match(kvs_store *s, const uint32_t *tokens, uint32_t n, uint32_t *n_blocks)
{
	if (!n_blocks || (n && !tokens))
		return -EINVAL;
	uint32_t bt = s->geom.block_tokens, nb = n / bt, got = 0;
	kvs_key k = KVS_KEY_ROOT, chunk[16];
	/* Keys are hashed a chunk at a time and their buckets prefetched, so
	 * the probes' cache misses overlap. */
	while (got < nb) {
		uint32_t c = nb - got < 16 ? nb - got : 16;
		for (uint32_t j = 0; j < c; j++) {
			k = kvs_key_chain(k, s->model, tokens + (size_t)(got + j) * bt, bt);
			chunk[j] = k;
			kvs_index_prefetch(&s->index, k);
		}
		uint32_t i = match_run(s, chunk, c);
		got += i;
		if (i < c)
			break;
	}
	*n_blocks = got;
	return 0;
}

int kvs_store_match_keys(kvs_store *s, const kvs_key *keys, uint32_t n, uint32_t *n_blocks)
{
	if (!n_blocks || (n && !keys))
		return -EINVAL;
	uint32_t got = 0;
	while (got < n) {
		uint32_t c = n - got < 16 ? n - got : 16;
		for (uint32_t j = 0; j < c; j++)
			kvs_index_prefetch(&s->index, keys[got + j]);
		uint32_t i = match_run(s, keys + got, c);
		got += i;
		if (i < c)
			break;
	}
	*n_blocks = got;
	return 0;
}

int kvs_store_lookup(kvs_store *s, kvs_key key, kvs_block_id *out)
{
	pthread_mutex_lock(&s->mu);
	uint32_t r = kvs_index_find(&s->index, key);
	if (r != NIL)
		*out = blk_id(s, r);
	pthread_mutex_unlock(&s->mu);
	return r != NIL ? 0 : -ENOENT;
}

/* ---- eviction --------------------------------------------------------------------- */

int kvs_store_evict(kvs_store *s, unsigned tier, uint32_t n, uint32_t *n_evicted)
{
	if (tier >= KVS_MAX_TIERS)
		return -EINVAL;
	uint32_t done = 0;
	pthread_mutex_lock(&s->mu);
	int rc = tier < s->n_tiers ? 0 : -EINVAL;
	for (; rc == 0 && done < n && s->tiers[tier].lru_tail != NIL; done++)
		evict(s, s->tiers[tier].lru_tail);
	pthread_mutex_unlock(&s->mu);
	if (n_evicted)
		*n_evicted = done;
	return rc;
}

/* ---- accounting ---------------------------------------------------------------------- */

static size_t meta_bytes(const kvs_store *s)
{
	size_t m = sizeof *s + (size_t)s->n_recs * (sizeof *s->blks + sizeof *s->pins) +
		   kvs_index_bytes(&s->index) +
		   ((size_t)s->seq_mask + 1) * sizeof *s->seq_tab;
	for (unsigned t = 0; t < s->n_tiers; t++) {
		kvs_arena_info ai;
		kvs_arena_get_info(s->tiers[t].arena, &ai);
		m += ai.meta_bytes;
	}
	m += s->seq_bytes; /* live sequences */
	return m;
}

void kvs_store_get_stats(kvs_store *s, kvs_store_stats *o)
{
	memset(o, 0, sizeof *o);
	pthread_mutex_lock(&s->mu);
	o->n_tiers = s->n_tiers;
	for (unsigned t = 0; t < s->n_tiers; t++) {
		const struct tier *ti = &s->tiers[t];
		o->tier[t] = (kvs_tier_stats){.capacity = ti->capacity,
					      .used = ti->used,
					      .free = ti->capacity - ti->used,
					      .evictable = ti->n_lru,
					      .tails = ti->tails,
					      .referenced = ti->used - ti->tails - ti->n_lru};
	}
	o->n_seqs = s->n_seqs;
	o->n_indexed = s->index.count;
	o->hits = atomic_load_explicit(&s->hits, memory_order_relaxed);
	o->misses = atomic_load_explicit(&s->misses, memory_order_relaxed);
	o->seals = s->seals;
	o->dedups = s->dedups;
	o->evictions = s->evictions;
	o->demotions = s->demotions;
	o->promotions = s->promotions;
	o->moves = s->moves;
	o->csum_failures = s->csum_failures;
	o->enospc = s->enospc;
	o->puts = s->puts;
	o->pins = s->n_pins;
	o->meta_bytes = meta_bytes(s);
	o->meta_bytes_per_block = (double)o->meta_bytes / s->n_recs;
	pthread_mutex_unlock(&s->mu);
}

/* ---- self-check ------------------------------------------------------------------------ */

#define CHECK(cond, ...)                                                                      \
	do {                                                                                  \
		if (!(cond)) {                                                                \
			slog(s, "level=error event=kvstore_check_failed " __VA_ARGS__);       \
			rc = -EUCLEAN;                                                        \
			goto out;                                                             \
		}                                                                             \
	} while (0)

int kvs_store_check(kvs_store *s, unsigned flags)
{
	int rc = 0;
	uint32_t *seen = NULL, *refs = calloc(s->n_recs ? s->n_recs : 1, sizeof *refs);
	uint32_t cap_all = 0;
	pthread_mutex_lock(&s->mu);
	for (unsigned t = 0; t < s->n_tiers; t++)
		cap_all += s->tiers[t].capacity;
	seen = calloc(cap_all ? cap_all : 1, sizeof *seen); /* per slot: owner record + 1 */
	CHECK(refs && seen, "what=no_memory");

	/* Sequences: count references, check tails are owned once. */
	uint32_t n_seqs = 0;
	for (uint32_t i = 0; i <= s->seq_mask; i++) {
		struct seq *q = s->seq_tab[i];
		if (!q)
			continue;
		n_seqs++;
		CHECK(seq_find(s, q->id) == q, "what=seq_unreachable seq=%llu",
		      (unsigned long long)q->id);
		uint64_t toks = 0;
		for (uint32_t e = 0; e < q->n_ents; e++) {
			toks += s->geom.block_tokens;
			if (q->ents[e].rec == NIL)
				continue;
			uint32_t r = blk_resolve(s, q->ents[e].ref);
			CHECK(r == q->ents[e].rec && s->blks[r].state == BLK_FULL,
			      "what=seq_entry_stale seq=%llu entry=%u", (unsigned long long)q->id, e);
			refs[r]++;
		}
		if (q->tail != NIL) {
			CHECK(s->blks[q->tail].state == BLK_TAIL && refs[q->tail] == 0,
			      "what=tail_shared seq=%llu", (unsigned long long)q->id);
			CHECK(q->tail_fill > 0 && q->tail_fill <= s->geom.block_tokens,
			      "what=tail_fill seq=%llu", (unsigned long long)q->id);
			refs[q->tail]++;
			toks += q->tail_fill;
		}
		CHECK(toks == q->n_tokens, "what=token_count seq=%llu", (unsigned long long)q->id);
	}
	CHECK(n_seqs == s->n_seqs, "what=seq_count");
	size_t sb = 0;
	for (uint32_t i = 0; i <= s->seq_mask; i++)
		if (s->seq_tab[i])
			sb += sizeof *s->seq_tab[i] + (size_t)s->seq_tab[i]->cap_ents * sizeof(struct seq_ent) +
			      (s->seq_tab[i]->tail_tokens ? (size_t)s->geom.block_tokens * 4 : 0);
	CHECK(sb == s->seq_bytes, "what=seq_bytes has=%zu want=%zu", s->seq_bytes, sb);

	/* Records: slot ownership, refs, index membership, tier counters. */
	uint32_t used[KVS_MAX_TIERS] = {0}, tails[KVS_MAX_TIERS] = {0}, lru[KVS_MAX_TIERS] = {0};
	uint32_t n_full = 0, n_free = 0, n_pins = 0;
	for (uint32_t r = 0; r < s->n_recs; r++) {
		struct blk *b = &s->blks[r];
		if (b->state == BLK_FREE) {
			CHECK(!(b->gen & 1) && !b->in_lru, "what=free_record_live rec=%u", r);
			n_free++;
			continue;
		}
		CHECK((b->gen & 1) && b->tier < s->n_tiers, "what=record_bad rec=%u", r);
		struct tier *t = &s->tiers[b->tier];
		CHECK(kvs_arena_check(t->arena, b->slot) == 0, "what=slot_not_allocated rec=%u", r);
		uint32_t gslot = kvs_handle_slot(b->slot);
		for (unsigned u = 0; u < b->tier; u++)
			gslot += s->tiers[u].capacity;
		CHECK(seen[gslot] == 0, "what=slot_in_two_records rec=%u other=%u", r,
		      seen[gslot] - 1);
		seen[gslot] = r + 1;
		used[b->tier]++;
		CHECK(b->refs == refs[r] + s->pins[r], "what=refcount rec=%u has=%u want=%u+%u pins",
		      r, b->refs, refs[r], s->pins[r]);
		n_pins += s->pins[r];
		if (b->state == BLK_TAIL) {
			tails[b->tier]++;
			CHECK(!b->in_lru && b->refs == 1, "what=tail_state rec=%u", r);
			continue;
		}
		if (b->state == BLK_LOOSE) {
			CHECK(!b->in_lru && refs[r] == 0 && s->pins[r] > 0 &&
				      kvs_index_find(&s->index, b->key) != r,
			      "what=loose_state rec=%u", r);
		} else {
			n_full++;
			CHECK(kvs_index_find(&s->index, b->key) == r, "what=not_indexed rec=%u", r);
		}
		CHECK(b->in_lru == (b->refs == 0), "what=lru_membership rec=%u refs=%u", r,
		      b->refs);
		if (flags & KVS_CHECK_CSUM) {
			uint64_t c;
			CHECK(kvs_arena_checksum(t->arena, b->slot, &c) == 0 && c == b->csum,
			      "what=checksum rec=%u", r);
		}
	}
	CHECK(n_pins == s->n_pins, "what=pin_count has=%u want=%u", s->n_pins, n_pins);
	CHECK(n_full == s->index.count, "what=index_count has=%u want=%u", s->index.count, n_full);
	uint32_t fl = 0;
	for (uint32_t r = s->rec_free; r != NIL && fl <= s->n_recs; r = s->blks[r].next)
		fl++;
	CHECK(fl == n_free, "what=record_free_list has=%u want=%u", fl, n_free);
	for (unsigned t = 0; t < s->n_tiers; t++) {
		struct tier *ti = &s->tiers[t];
		CHECK(used[t] == ti->used && tails[t] == ti->tails, "what=tier_counts tier=%u", t);
		CHECK(kvs_arena_count_used(ti->arena) == ti->used && ti->used <= ti->capacity,
		      "what=arena_used tier=%u arena=%u store=%u", t,
		      kvs_arena_count_used(ti->arena), ti->used);
		uint32_t prev = NIL;
		for (uint32_t r = ti->lru_head; r != NIL; prev = r, r = s->blks[r].next) {
			CHECK(lru[t] < s->n_recs && s->blks[r].in_lru && s->blks[r].tier == t &&
				      s->blks[r].prev == prev,
			      "what=lru_list tier=%u rec=%u", t, r);
			lru[t]++;
		}
		CHECK(prev == ti->lru_tail && lru[t] == ti->n_lru, "what=lru_count tier=%u", t);
	}
out:
	pthread_mutex_unlock(&s->mu);
	free(seen);
	free(refs);
	return rc;
}
