/* Sequences and block placement: CreateSequence, ExtendSequence,
 * GetSequence, ReleaseSequence.
 *
 * A sequence is a durable record "seqs/ID" (a packed kvmesh.v1.Sequence:
 * model, home node, token count, and for each block index the node that
 * holds it). Where new blocks go is the ledger's decision: the home node
 * while it has room, then creditors ranked by link bandwidth within their
 * lending caps. Block handles are not stored: they belong to the agents and
 * come back as soft state with block reports (blocks.c), overlaid on every
 * Sequence returned. A sequence created from a prompt whose leading full
 * blocks are in the prefix index shares them: its first placements are the
 * existing blocks (their keys and nodes stored in its record, and in the
 * writer's), counted by reference, charged to the ledger once. At start, the
 * ledger's reservations and the shared blocks' refs are rebuilt from the
 * stored sequences. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "coordinator/coord_impl.h"

#define MAX_GRANTS 64
/* Most leading blocks a new sequence shares (bounds the work of a match). */
#define MAX_SHARED (1u << 20)

/* A model's block_tokens, or 0 if the model is unknown. */
static uint32_t block_tokens_of(kvm_coord *c, const char *model_id)
{
	char key[128];
	snprintf(key, sizeof(key), "models/%s", model_id);
	void *v;
	size_t len;
	if (kvm_state_get(c->st, key, &v, &len) != 0)
		return 0;
	Kvmesh__V1__Model *m = kvmesh__v1__model__unpack(NULL, len, v);
	free(v);
	uint32_t bt = m && m->geometry ? m->geometry->block_tokens : 0;
	if (m)
		kvmesh__v1__model__free_unpacked(m, NULL);
	return bt;
}

static void set_block_tokens(Kvmesh__V1__BlockPlacement **b, size_t n, uint64_t tokens, uint32_t bt);

/* ---- Extension records ------------------------------------------------------------
 * An extend appends "seqx/ID/FIRST" (FIRST: the index of its first block, in
 * 10 digits, so that key order is block order): a Sequence holding only the
 * new placements and the token count after them. Rewriting the whole record
 * on every extend made each extend of a long sequence cost its whole length
 * in the log (8,192 blocks: ~220 KB an extend, a gigabyte over its life).
 * The whole record is written again, and its extensions deleted, on any
 * other change and once the extensions hold more blocks than it does (or
 * EXT_MAX of them), so a sequence's log bytes grow linearly with its blocks.
 * A merge takes an extension's block only where it continues the blocks so
 * far (index == count): a stale extension, left by a crash between a rewrite
 * and its deletes, holds only indices the rewrite already has, and is
 * skipped. Extensions whose sequence is gone (a crash inside a release) are
 * deleted at start. */
#define EXT_MAX 256

typedef struct ext_list {
	char (*keys)[128];
	Kvmesh__V1__Sequence **recs; /* unpacked, when asked for */
	size_t n, cap;
	bool unpack;
	int err;
} ext_list;

static int collect_ext(void *arg, const char *key, const void *val, size_t len)
{
	ext_list *l = arg;
	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 8;
		void *k = realloc(l->keys, cap * sizeof(*l->keys));
		if (k)
			l->keys = k;
		void *r = k ? realloc(l->recs, cap * sizeof(*l->recs)) : NULL;
		if (r)
			l->recs = r;
		if (!k || !r)
			return l->err = -ENOMEM;
		l->cap = cap;
	}
	snprintf(l->keys[l->n], sizeof(l->keys[0]), "%s", key);
	l->recs[l->n] = l->unpack ? kvmesh__v1__sequence__unpack(NULL, len, val) : NULL;
	l->n++;
	return 0;
}

static void ext_list_free(ext_list *l)
{
	for (size_t i = 0; i < l->n; i++)
		if (l->recs[i])
			kvmesh__v1__sequence__free_unpacked(l->recs[i], NULL);
	free(l->keys);
	free(l->recs);
}

/* The extension records under prefix ("seqx/ID/" for one sequence); the
 * caller frees *l with ext_list_free. */
static int ext_load(kvm_coord *c, const char *prefix, bool unpack, ext_list *l)
{
	memset(l, 0, sizeof(*l));
	l->unpack = unpack;
	int rc = kvm_state_scan(c->st, prefix, collect_ext, l);
	return rc ? rc : l->err;
}

/* Deletes a sequence's extension records; *ticket rises to the last. */
static int drop_exts(kvm_coord *c, const char *id, uint64_t *ticket)
{
	char prefix[96];
	snprintf(prefix, sizeof(prefix), "seqx/%s/", id);
	ext_list l;
	int rc = ext_load(c, prefix, false, &l);
	for (size_t i = 0; rc == 0 && i < l.n; i++) {
		uint64_t t;
		rc = kvm_state_del_async(c->st, l.keys[i], &t);
		if (rc == 0 && t > *ticket)
			*ticket = t;
	}
	ext_list_free(&l);
	return rc;
}

/* Appends to s the blocks of its extension records that continue it, with
 * the token count after them, and sets each block's tokens again (the old
 * tail filled up). Returns how many records there were, or -errno. */
static int merge_exts(kvm_coord *c, Kvmesh__V1__Sequence *s)
{
	char prefix[96];
	snprintf(prefix, sizeof(prefix), "seqx/%s/", s->id);
	ext_list l;
	int rc = ext_load(c, prefix, true, &l);
	bool grew = false;
	for (size_t i = 0; rc == 0 && i < l.n; i++) {
		Kvmesh__V1__Sequence *e = l.recs[i];
		if (!e || !e->n_blocks || e->blocks[0]->index != s->n_blocks)
			continue; /* stale (or unreadable) */
		Kvmesh__V1__BlockPlacement **b =
			realloc(s->blocks, (s->n_blocks + e->n_blocks) * sizeof(*b));
		if (!b) {
			rc = -ENOMEM;
			break;
		}
		s->blocks = b; /* protobuf-c's default allocator is malloc's */
		size_t kept = 0;
		for (size_t j = 0; j < e->n_blocks; j++) {
			if (e->blocks[j]->index == s->n_blocks)
				s->blocks[s->n_blocks++] = e->blocks[j]; /* moved */
			else
				e->blocks[kept++] = e->blocks[j];
		}
		e->n_blocks = kept;
		s->tokens = e->tokens;
		grew = true;
	}
	if (rc == 0 && grew) {
		soft_seq *ss = coord_soft_find(c, s->id);
		uint32_t bt = ss && ss->bt ? ss->bt : block_tokens_of(c, s->model_id);
		if (bt)
			set_block_tokens(s->blocks, s->n_blocks, s->tokens, bt);
	}
	size_t n = l.n;
	ext_list_free(&l);
	return rc ? rc : (int)n;
}

/* The stored sequence id with its extensions merged; NULL if there is none
 * (or no memory). *base_blocks and *exts (may be NULL): blocks in its whole
 * record, and its extension records. */
static Kvmesh__V1__Sequence *load_seq_counted(kvm_coord *c, const char *id, uint32_t *base_blocks,
					      uint32_t *exts)
{
	char key[128];
	snprintf(key, sizeof(key), "seqs/%s", id);
	void *v;
	size_t len;
	if (kvm_state_get(c->st, key, &v, &len) != 0)
		return NULL;
	Kvmesh__V1__Sequence *s = kvmesh__v1__sequence__unpack(NULL, len, v);
	free(v);
	if (!s)
		return NULL;
	if (base_blocks)
		*base_blocks = (uint32_t)s->n_blocks;
	int n = merge_exts(c, s);
	if (n < 0) {
		kvmesh__v1__sequence__free_unpacked(s, NULL);
		return NULL;
	}
	if (exts)
		*exts = (uint32_t)n;
	return s;
}

static Kvmesh__V1__Sequence *load_seq(kvm_coord *c, const char *id)
{
	return load_seq_counted(c, id, NULL, NULL);
}

/* Appends the record; *ticket is what kvm_state_sync must see durable before
 * the change is acknowledged (done outside c->mu, so that concurrent calls
 * share one fsync). upkeep: the coordinator's own bookkeeping (a move, a
 * degraded mark), which a full disk's reserve still takes; a client's new
 * state (a create, an extend) is refused first. */
static int store_seq(kvm_coord *c, const Kvmesh__V1__Sequence *s, bool upkeep, uint64_t *ticket)
{
	char key[128];
	snprintf(key, sizeof(key), "seqs/%s", s->id);
	size_t n = kvmesh__v1__sequence__get_packed_size(s);
	uint8_t *buf = malloc(n ? n : 1);
	if (!buf)
		return -ENOMEM;
	kvmesh__v1__sequence__pack(s, buf);
	int rc = upkeep ? kvm_state_upkeep_async(c->st, key, buf, n, ticket)
			: kvm_state_put_async(c->st, key, buf, n, ticket);
	free(buf);
	/* The whole record has every block now. Extensions left behind (no
	 * room, no memory) are skipped by every merge: the change stands. */
	if (rc == 0)
		(void)drop_exts(c, s->id, ticket);
	soft_seq *ss = rc == 0 ? coord_soft_find(c, s->id) : NULL;
	if (ss) {
		ss->tokens = s->tokens;
		ss->stored_blocks = (uint32_t)s->n_blocks;
		ss->ext_records = 0;
	}
	return rc;
}

/* Appends an extension record: blocks p[0..n) (the first at index first)
 * and the token count after them. A client's new state, as a create. */
static int store_ext(kvm_coord *c, soft_seq *ss, uint64_t tokens,
		     Kvmesh__V1__BlockPlacement **p, size_t n, uint32_t first, uint64_t *ticket)
{
	char key[128];
	snprintf(key, sizeof(key), "seqx/%s/%010" PRIu32, ss->id, first);
	Kvmesh__V1__Sequence e = KVMESH__V1__SEQUENCE__INIT;
	e.tokens = tokens;
	e.blocks = p;
	e.n_blocks = n;
	size_t len = kvmesh__v1__sequence__get_packed_size(&e);
	uint8_t *buf = malloc(len ? len : 1);
	if (!buf)
		return -ENOMEM;
	kvmesh__v1__sequence__pack(&e, buf);
	int rc = kvm_state_put_async(c->st, key, buf, len, ticket);
	free(buf);
	if (rc == 0) {
		ss->tokens = tokens;
		ss->ext_records++;
	}
	return rc;
}

static void emit_seq_event(kvm_coord *c, const char *id, Kvmesh__V1__SequenceEvent__Kind kind,
			   uint32_t *lost, size_t n_lost, const char *reason)
{
	Kvmesh__V1__SequenceEvent se = KVMESH__V1__SEQUENCE_EVENT__INIT;
	se.sequence_id = (char *)id;
	se.kind = kind;
	se.lost_blocks = lost;
	se.n_lost_blocks = n_lost;
	se.reason = (char *)reason;
	Kvmesh__V1__Event ev = KVMESH__V1__EVENT__INIT;
	ev.kind_case = KVMESH__V1__EVENT__KIND_SEQUENCE;
	ev.sequence = &se;
	coord_emit(c, &ev);
}

/* A node's data-plane address for placements ("" if unknown); mu held. */
static char *data_address_of(kvm_coord *c, const char *node, char *buf, size_t cap)
{
	buf[0] = '\0';
	node_rec *nd = coord_find_node(c, node);
	if (nd) {
		Kvmesh__V1__Node *reg = kvmesh__v1__node__unpack(NULL, nd->reg_len, nd->reg);
		if (reg) {
			snprintf(buf, cap, "%s", reg->data_address);
			kvmesh__v1__node__free_unpacked(reg, NULL);
		}
	}
	return buf;
}

/* New placements for `blocks` more blocks of a sequence: reserves them in
 * the ledger and fills `out` (caller frees the array and node strings with
 * free_placements). first: index of the first new block. */
typedef struct new_blocks {
	Kvmesh__V1__BlockPlacement *p;
	Kvmesh__V1__BlockPlacement **ptrs;
	size_t n;
} new_blocks;

static void free_new_blocks(new_blocks *nb)
{
	for (size_t i = 0; i < nb->n; i++) {
		free(nb->p[i].node_id);
		free(nb->p[i].data_address);
	}
	free(nb->p);
	free(nb->ptrs);
}

/* Reserves and lays out n blocks; returns 0, -ENOSPC, -E2BIG, -ENOMEM. */
static int place(kvm_coord *c, const char *home, uint32_t first, uint64_t n, new_blocks *out)
{
	memset(out, 0, sizeof(*out));
	if (n == 0)
		return 0;
	kvm_ledger_grant g[MAX_GRANTS];
	size_t ng;
	int rc = kvm_ledger_reserve(c->ledger, home, n, g, MAX_GRANTS, &ng);
	if (rc != 0)
		return rc;
	out->p = calloc(n, sizeof(*out->p));
	out->ptrs = calloc(n, sizeof(*out->ptrs));
	if (!out->p || !out->ptrs) {
		for (size_t k = 0; k < ng; k++)
			kvm_ledger_release(c->ledger, home, g[k].id, g[k].blocks);
		free(out->p);
		free(out->ptrs);
		return -ENOMEM;
	}
	for (size_t k = 0; k < ng; k++) {
		char addr[256];
		data_address_of(c, g[k].id, addr, sizeof(addr));
		if (g[k].evict)
			kvm_log(KVM_LOG_INFO, "evict_for_placement", "node=%s blocks=%" PRIu64,
				g[k].id, g[k].evict);
		for (uint64_t b = 0; b < g[k].blocks; b++) {
			Kvmesh__V1__BlockPlacement *p = &out->p[out->n];
			kvmesh__v1__block_placement__init(p);
			p->index = first + (uint32_t)out->n;
			p->node_id = strdup(g[k].id);
			p->data_address = strdup(addr);
			p->borrowed = strcmp(g[k].id, home) != 0;
			out->ptrs[out->n] = p;
			out->n++;
		}
	}
	return 0;
}

/* Sets each block's valid token count for a sequence of `tokens` tokens. */
static void set_block_tokens(Kvmesh__V1__BlockPlacement **b, size_t n, uint64_t tokens, uint32_t bt)
{
	for (size_t i = 0; i < n; i++) {
		uint64_t start = (uint64_t)b[i]->index * bt;
		b[i]->tokens = tokens > start ? (uint32_t)(tokens - start < bt ? tokens - start : bt) : 0;
	}
}

static const char *place_error(int rc)
{
	switch (rc) {
	case -ENOSPC:
		return "no room for the blocks anywhere in the cluster (home full, creditors at their "
		       "lending caps, nothing evictable)";
	case -ENOENT:
		return "the home node is unknown";
	case -E2BIG:
		return "the blocks would need more than 64 nodes at once";
	default:
		return strerror(-rc);
	}
}

/* Picks a home: the ready node of the model with the most free blocks; mu
 * held. */
static const char *pick_home(kvm_coord *c, const char *model)
{
	const char *best = NULL;
	uint64_t best_free = 0;
	for (size_t i = 0; i < c->n_nodes; i++) {
		kvm_ledger_node ln;
		if (c->nodes[i].state != KVMESH__V1__NODE_STATE__NODE_READY ||
		    !kvm_ledger_models_match(c->nodes[i].model, model) ||
		    kvm_ledger_node_get(c->ledger, c->nodes[i].id, &ln) != 0)
			continue;
		uint64_t held = ln.used_blocks + ln.evictable_blocks;
		uint64_t fr = ln.total_blocks > held ? ln.total_blocks - held : 0;
		if (!best || fr > best_free) {
			best = c->nodes[i].id;
			best_free = fr;
		}
	}
	return best;
}

/* Soft state laid over a sequence read from the store: data_id, and the
 * handle, key and tokens of each placement where reports gave them. Undone
 * (overlay_undo) before the message is freed, since the memory is ours. */
typedef struct overlay {
	size_t n;
	Kvmesh__V1__BlockHandle *h;
	Kvmesh__V1__BlockHandle **saved_h;
	ProtobufCBinaryData *saved_key;
	uint8_t (*kb)[16];
} overlay;

static void overlay_apply(kvm_coord *c, Kvmesh__V1__Sequence *s, overlay *o)
{
	memset(o, 0, sizeof(*o));
	s->data_id = coord_data_id(s->id);
	soft_seq *ss = coord_soft_find(c, s->id);
	size_t n = s->n_blocks;
	if (!ss || n == 0)
		return;
	o->h = calloc(n, sizeof(*o->h));
	o->saved_h = calloc(n, sizeof(*o->saved_h));
	o->saved_key = calloc(n, sizeof(*o->saved_key));
	o->kb = calloc(n, sizeof(*o->kb));
	if (!o->h || !o->saved_h || !o->saved_key || !o->kb) {
		free(o->h);
		free(o->saved_h);
		free(o->saved_key);
		free(o->kb);
		memset(o, 0, sizeof(*o));
		return; /* no handles this time; the placements are still right */
	}
	o->n = n;
	for (size_t i = 0; i < n; i++) {
		Kvmesh__V1__BlockPlacement *p = s->blocks[i];
		o->saved_h[i] = p->handle;
		o->saved_key[i] = p->key;
		if (i >= ss->n)
			continue;
		const soft_slot *sl = &ss->slots[i];
		const Kvmesh__V1__BlockHandle *h = NULL;
		if (sl->be && sl->be->known) {
			h = &sl->be->h;
			p->tokens = sl->be->tokens;
			kvs_key_to_bytes(sl->be->key, o->kb[i]);
			p->key.data = o->kb[i];
			p->key.len = 16;
		} else if (!sl->be && sl->known) {
			h = &sl->h;
			p->tokens = sl->tokens;
			if (sl->keyed) {
				kvs_key_to_bytes(sl->key, o->kb[i]);
				p->key.data = o->kb[i];
				p->key.len = 16;
			}
		}
		if (h) {
			kvmesh__v1__block_handle__init(&o->h[i]);
			o->h[i].slot = h->slot;
			o->h[i].generation = h->generation;
			o->h[i].tier = h->tier;
			p->handle = &o->h[i];
		}
	}
}

static void overlay_undo(Kvmesh__V1__Sequence *s, overlay *o)
{
	for (size_t i = 0; i < o->n && i < s->n_blocks; i++) {
		s->blocks[i]->handle = o->saved_h[i];
		s->blocks[i]->key = o->saved_key[i];
	}
	free(o->h);
	free(o->saved_h);
	free(o->saved_key);
	free(o->kb);
	memset(o, 0, sizeof(*o));
}

/* Writes the keys of shared blocks into their writers' records (once per
 * block), so that refs can be rebuilt after a restart. No fsync of its own:
 * the caller's sync covers it (tickets only grow). */
static void store_writer_keys(kvm_coord *c, blk_ent **run, uint32_t k, uint64_t *ticket)
{
	for (uint32_t i = 0; i < k; i++) {
		soft_seq *w = run[i]->writer;
		if (!w || run[i]->writer_key_stored)
			continue;
		Kvmesh__V1__Sequence *s = load_seq(c, w->id);
		if (!s)
			continue;
		ProtobufCBinaryData *saved = calloc(s->n_blocks + 1, sizeof(*saved));
		uint8_t(*kb)[16] = calloc(s->n_blocks + 1, sizeof(*kb));
		if (saved && kb) {
			for (size_t b = 0; b < s->n_blocks; b++)
				saved[b] = s->blocks[b]->key;
			/* Every block of this writer in the run, in one record write. */
			for (uint32_t j = i; j < k; j++) {
				if (run[j]->writer != w || run[j]->writer_key_stored ||
				    run[j]->writer_index >= s->n_blocks)
					continue;
				kvs_key_to_bytes(run[j]->key, kb[run[j]->writer_index]);
				s->blocks[run[j]->writer_index]->key.data = kb[run[j]->writer_index];
				s->blocks[run[j]->writer_index]->key.len = 16;
				run[j]->writer_key_stored = true;
			}
			uint64_t t = 0;
			if (store_seq(c, s, true, &t) == 0 && t > *ticket)
				*ticket = t;
			for (size_t b = 0; b < s->n_blocks; b++)
				s->blocks[b]->key = saved[b];
		}
		free(saved);
		free(kb);
		kvmesh__v1__sequence__free_unpacked(s, NULL);
	}
}

/* The shared placements of a new sequence (k blocks of `run`); the caller
 * frees with free_new_blocks. */
static int shared_blocks(kvm_coord *c, const char *home, blk_ent **run, uint32_t k,
			 new_blocks *out, Kvmesh__V1__BlockHandle *h, uint8_t (*kb)[16])
{
	memset(out, 0, sizeof(*out));
	out->p = calloc(k + 1, sizeof(*out->p));
	out->ptrs = calloc(k + 1, sizeof(*out->ptrs));
	if (!out->p || !out->ptrs) {
		free(out->p);
		free(out->ptrs);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < k; i++) {
		Kvmesh__V1__BlockPlacement *p = &out->p[i];
		const char *node = c->nodes[run[i]->node].id;
		char addr[256];
		kvmesh__v1__block_placement__init(p);
		p->index = i;
		p->node_id = strdup(node);
		p->data_address = strdup(data_address_of(c, node, addr, sizeof(addr)));
		p->borrowed = strcmp(node, home) != 0;
		p->tokens = run[i]->tokens;
		kvs_key_to_bytes(run[i]->key, kb[i]);
		p->key.data = kb[i];
		p->key.len = 16;
		kvmesh__v1__block_handle__init(&h[i]);
		h[i].slot = run[i]->h.slot;
		h[i].generation = run[i]->h.generation;
		h[i].tier = run[i]->h.tier;
		out->ptrs[i] = p;
		out->n++;
	}
	return 0;
}

int coord_create_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	Kvmesh__V1__CreateSequenceRequest *r =
		kvmesh__v1__create_sequence_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed CreateSequenceRequest");
	int rc;
	char id[64];
	uint64_t ticket = 0;
	pthread_mutex_lock(&c->mu);
	uint32_t bt = block_tokens_of(c, r->model_id);
	if (r->sequence_id[0])
		snprintf(id, sizeof(id), "%s", r->sequence_id);
	else
		snprintf(id, sizeof(id), "seq-%" PRIu64 "-%" PRIu64, coord_now_ms(), ++c->next_seq_id);
	const char *home = r->home_node[0] ? r->home_node : pick_home(c, r->model_id);
	node_rec *hn = home ? coord_find_node(c, home) : NULL;
	Kvmesh__V1__Sequence *old = NULL;
	if (bt == 0) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown model \"%s\"", r->model_id);
	} else if (!coord_valid_id(id)) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				  "sequence_id must be 1-63 characters of [A-Za-z0-9._-]");
	} else if ((old = load_seq(c, id)) != NULL) {
		rc = kvm_rpc_fail(call, KVM_RPC_ALREADY_EXISTS, "sequence %s exists", id);
	} else if (!home) {
		rc = kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE, "no ready node of model %s to be the home node",
				  r->model_id);
	} else if (!hn) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown home node \"%s\"", home);
	} else if (hn->state != KVMESH__V1__NODE_STATE__NODE_READY) {
		/* A cordoned or draining node takes no new tails either. */
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION, "home node %s is %s", home,
				  hn->state == KVMESH__V1__NODE_STATE__NODE_DEAD       ? "dead"
				  : hn->state == KVMESH__V1__NODE_STATE__NODE_DRAINING ? "draining"
										       : "cordoned");
	} else if (!kvm_ledger_models_match(hn->model, r->model_id)) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION,
				  "home node %s holds the KV of model %s, not %s", home, hn->model,
				  r->model_id);
	} else {
		uint64_t tokens = r->n_prompt_tokens;
		uint64_t blocks = (tokens + bt - 1) / bt;
		/* The prompt's leading full blocks already in the cluster are shared;
		 * the sequence then holds just those, and the client extends for the
		 * rest. Without a match, every prompt block is placed here. */
		uint32_t full = (uint32_t)(tokens / bt < MAX_SHARED ? tokens / bt : MAX_SHARED);
		if (c->n_blks == 0)
			full = 0; /* nothing to match: skip hashing the prompt */
		blk_ent **run = full ? calloc(full, sizeof(*run)) : NULL;
		uint32_t k = run ? coord_match_run(c, coord_model_hash(r->model_id), bt,
						   r->prompt_tokens, r->n_prompt_tokens, run, full)
				 : 0;
		Kvmesh__V1__BlockHandle *sh = k ? calloc(k, sizeof(*sh)) : NULL;
		uint8_t(*kb)[16] = k ? calloc(k, sizeof(*kb)) : NULL;
		new_blocks nb;
		int prc;
		if (k && (!sh || !kb))
			prc = -ENOMEM;
		else if (k)
			prc = shared_blocks(c, home, run, k, &nb, sh, kb);
		else
			prc = place(c, home, 0, blocks, &nb);
		soft_seq *ss = prc == 0 ? coord_soft_add(c, id, home, r->model_id, bt) : NULL;
		if (ss)
			ss->shared_prefix = k;
		for (size_t i = 0; ss && i < nb.n; i++)
			if (coord_soft_push(c, ss, nb.p[i].node_id) != 0) {
				coord_soft_remove(c, ss);
				ss = NULL;
			}
		if (prc == 0 && !ss) {
			if (!k)
				for (size_t i = 0; i < nb.n; i++)
					kvm_ledger_release(c->ledger, home, nb.p[i].node_id, 1);
			free_new_blocks(&nb);
			prc = -ENOMEM;
		}
		if (prc != 0) {
			rc = kvm_rpc_fail(call, prc == -ENOSPC ? KVM_RPC_RESOURCE_EXHAUSTED
				  : prc == -ENOMEM ? KVM_RPC_RESOURCE_EXHAUSTED
						   : KVM_RPC_FAILED_PRECONDITION,
					  "sequence %s: %" PRIu64 " blocks: %s", id, blocks,
					  place_error(prc));
		} else {
			Kvmesh__V1__Sequence s = KVMESH__V1__SEQUENCE__INIT;
			s.id = id;
			s.model_id = r->model_id;
			s.home_node = (char *)home;
			s.home_epoch = 1;
			s.tokens = k ? (uint64_t)k * bt : tokens;
			s.n_blocks = nb.n;
			s.blocks = nb.ptrs;
			s.shared_prefix_blocks = k;
			s.data_id = ss->data_id;
			if (!k)
				set_block_tokens(nb.ptrs, nb.n, tokens, bt);
			/* Extensions of an earlier sequence of this id that a
			 * release left behind go first, so no crash can merge
			 * them into this one. */
			(void)drop_exts(c, id, &ticket);
			int src = store_seq(c, &s, false, &ticket);
			if (src != 0) {
				if (!k)
					for (size_t i = 0; i < nb.n; i++)
						kvm_ledger_release(c->ledger, home, nb.p[i].node_id, 1);
				coord_soft_remove(c, ss);
				rc = coord_store_fail(c, call, src);
			} else {
				for (uint32_t i = 0; i < k; i++) {
					run[i]->refs++;
					ss->slots[i].be = run[i];
				}
				store_writer_keys(c, run, k, &ticket);
				emit_seq_event(c, id, KVMESH__V1__SEQUENCE_EVENT__KIND__CREATED, NULL, 0,
					       k ? "created sharing a prefix" : "created");
				for (uint32_t i = 0; i < k; i++)
					nb.p[i].handle = &sh[i]; /* soft: in the reply, not the record */
				rc = coord_reply(call, &s.base);
				for (uint32_t i = 0; i < k; i++)
					nb.p[i].handle = NULL;
				if (k)
					kvm_log(KVM_LOG_INFO, "prefix_shared",
						"sequence=%s blocks=%" PRIu32, id, k);
			}
			for (size_t i = 0; i < nb.n; i++) /* the keys are ours, not malloc'd */
				nb.p[i].key.data = NULL;
			free_new_blocks(&nb);
		}
		free(run);
		free(sh);
		free(kb);
	}
	pthread_mutex_unlock(&c->mu);
	rc = coord_reply_when_durable(c, call, rc, ticket);
	if (old)
		kvmesh__v1__sequence__free_unpacked(old, NULL);
	kvmesh__v1__create_sequence_request__free_unpacked(r, NULL);
	return rc;
}

/* A sequence's header as its soft entry keeps it, for replies that leave
 * the blocks out (block_count says how many). Points into ss and c. */
static void seq_header(kvm_coord *c, soft_seq *ss, Kvmesh__V1__Sequence *s)
{
	s->id = ss->id;
	s->model_id = ss->model_id;
	s->home_node = ss->home < c->n_nodes ? c->nodes[ss->home].id : (char *)"";
	s->home_epoch = ss->home_epoch;
	s->tokens = ss->tokens;
	s->degraded = ss->degraded;
	s->shared_prefix_blocks = ss->shared_prefix;
	s->data_id = ss->data_id;
	s->block_count = (uint32_t)ss->n;
}

/* Records blocks nb (from index have) and the token count after them:
 * usually as an extension record; as the whole record once the extensions
 * would hold more blocks than it, or EXT_MAX of them. mu held. */
static int store_extend(kvm_coord *c, soft_seq *ss, uint64_t tokens, uint32_t bt,
			new_blocks *nb, uint32_t have, uint64_t *ticket)
{
	uint64_t in_exts = (uint64_t)have + nb->n - ss->stored_blocks;
	if (ss->ext_records < EXT_MAX && in_exts <= ss->stored_blocks)
		return store_ext(c, ss, tokens, nb->ptrs, nb->n, have, ticket);
	Kvmesh__V1__Sequence *s = load_seq(c, ss->id);
	if (!s)
		return -ENOMEM; /* it is there: ss says so */
	int rc = -ENOMEM;
	Kvmesh__V1__BlockPlacement **all = calloc(s->n_blocks + nb->n + 1, sizeof(*all));
	if (all && s->n_blocks == have) {
		Kvmesh__V1__BlockPlacement **saved = s->blocks;
		size_t saved_n = s->n_blocks;
		if (have) /* memcpy from NULL is undefined */
			memcpy(all, s->blocks, have * sizeof(*all));
		memcpy(all + have, nb->ptrs, nb->n * sizeof(*all));
		s->blocks = all;
		s->n_blocks = have + nb->n;
		s->tokens = tokens;
		set_block_tokens(all, s->n_blocks, tokens, bt);
		rc = store_seq(c, s, false, ticket);
		s->blocks = saved; /* give protobuf-c back its own array */
		s->n_blocks = saved_n;
	} else if (all) {
		rc = -EIO; /* the record and the soft entry disagree */
	}
	free(all);
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return rc;
}

/* ExtendSequence: from the soft entry, in time and log bytes that do not
 * grow with the sequence's length; the reply holds the new placements and
 * the sequence's header without its blocks (GetSequence has them). */
int coord_extend_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	Kvmesh__V1__ExtendSequenceRequest *r =
		kvmesh__v1__extend_sequence_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed ExtendSequenceRequest");
	int rc;
	uint64_t ticket = 0;
	pthread_mutex_lock(&c->mu);
	soft_seq *ss = coord_soft_find(c, r->sequence_id);
	uint32_t bt = ss ? (ss->bt ? ss->bt : block_tokens_of(c, ss->model_id)) : 0;
	if (!ss) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown sequence \"%s\"", r->sequence_id);
	} else if (bt == 0) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION, "model %s of sequence %s is gone",
				  ss->model_id, ss->id);
	} else if (r->tokens == 0 || r->tokens > (1u << 26)) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				  "tokens must be 1..%u, not %u", 1u << 26, r->tokens);
	} else if (ss->degraded) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION,
				  "sequence %s is degraded (blocks lost with a dead node)", ss->id);
	} else {
		const char *home = ss->home < c->n_nodes ? c->nodes[ss->home].id : "";
		uint64_t tokens = ss->tokens + r->tokens;
		uint32_t have = (uint32_t)ss->n;
		uint64_t want = (tokens + bt - 1) / bt;
		new_blocks nb;
		int prc = place(c, home, have, want - have, &nb);
		if (prc != 0) {
			rc = kvm_rpc_fail(call, prc == -ENOSPC ? KVM_RPC_RESOURCE_EXHAUSTED
							       : KVM_RPC_FAILED_PRECONDITION,
					  "sequence %s: %" PRIu64 " more blocks: %s", ss->id,
					  want - have, place_error(prc));
		} else {
			set_block_tokens(nb.ptrs, nb.n, tokens, bt);
			int src = 0;
			for (size_t i = 0; src == 0 && i < nb.n; i++)
				src = coord_soft_push(c, ss, nb.p[i].node_id);
			if (src == 0)
				src = store_extend(c, ss, tokens, bt, &nb, have, &ticket);
			if (src != 0) {
				ss->n = have;
				for (size_t i = 0; i < nb.n; i++)
					kvm_ledger_release(c->ledger, home, nb.p[i].node_id, 1);
				rc = coord_store_fail(c, call, src);
			} else {
				emit_seq_event(c, ss->id, KVMESH__V1__SEQUENCE_EVENT__KIND__EXTENDED,
					       NULL, 0, "extended");
				Kvmesh__V1__Sequence hdr = KVMESH__V1__SEQUENCE__INIT;
				seq_header(c, ss, &hdr);
				Kvmesh__V1__ExtendSequenceResponse resp =
					KVMESH__V1__EXTEND_SEQUENCE_RESPONSE__INIT;
				resp.n_new_blocks = nb.n;
				resp.new_blocks = nb.ptrs;
				resp.sequence = &hdr;
				rc = coord_reply(call, &resp.base);
			}
			free_new_blocks(&nb);
		}
	}
	pthread_mutex_unlock(&c->mu);
	rc = coord_reply_when_durable(c, call, rc, ticket);
	kvmesh__v1__extend_sequence_request__free_unpacked(r, NULL);
	return rc;
}

int coord_get_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	Kvmesh__V1__GetSequenceRequest *r = kvmesh__v1__get_sequence_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed GetSequenceRequest");
	int rc;
	Kvmesh__V1__Sequence *s = NULL;
	pthread_mutex_lock(&c->mu);
	if (r->sequence_id[0]) {
		s = load_seq(c, r->sequence_id);
		rc = s ? KVM_RPC_OK
		       : kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown sequence \"%s\"",
				      r->sequence_id);
	} else if (r->data_id) {
		/* Agents name sequences by data_id on the data plane. */
		soft_seq *ss = coord_soft_find_data(c, r->data_id);
		s = ss ? load_seq(c, ss->id) : NULL;
		rc = s ? KVM_RPC_OK
		       : kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "no sequence has data_id %" PRIu64,
				      r->data_id);
	} else {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				  "sequence_id or data_id is required");
	}
	if (s) {
		overlay ov;
		overlay_apply(c, s, &ov);
		rc = coord_reply(call, &s->base);
		overlay_undo(s, &ov);
	}
	pthread_mutex_unlock(&c->mu);
	if (s)
		kvmesh__v1__sequence__free_unpacked(s, NULL);
	kvmesh__v1__get_sequence_request__free_unpacked(r, NULL);
	return rc;
}

/* ListSequences: from the soft entries, which mirror the stored records
 * (unpacking every record, blocks and all, took half a second under mu for
 * a million placements, stalling every control call). The matching rows
 * are copied under mu, then sorted by id (paging goes by id) and packed
 * without it. */
typedef struct list_row {
	char id[64], model_id[64], home[64];
	uint64_t tokens, data_id, home_epoch;
	uint32_t blocks, shared;
	bool degraded;
} list_row;

static int row_id_cmp(const void *x, const void *y)
{
	return strcmp(((const list_row *)x)->id, ((const list_row *)y)->id);
}

int coord_list_sequences(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	Kvmesh__V1__ListSequencesRequest *r = kvmesh__v1__list_sequences_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed ListSequencesRequest");
	uint32_t limit = r->limit ? r->limit : 1000;
	if (limit > 100000) {
		kvmesh__v1__list_sequences_request__free_unpacked(r, NULL);
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "limit %u is above 100000", r->limit);
	}
	pthread_mutex_lock(&c->mu);
	list_row *rows = malloc((c->n_seqs ? c->n_seqs : 1) * sizeof(*rows));
	size_t n = 0;
	for (size_t b = 0; rows && b < c->seq_buckets; b++)
		for (soft_seq *ss = c->seqs[b]; ss; ss = ss->next) {
			if ((r->model_id[0] && strcmp(ss->model_id, r->model_id) != 0) ||
			    (r->after[0] && strcmp(ss->id, r->after) <= 0))
				continue;
			list_row *w = &rows[n++];
			snprintf(w->id, sizeof(w->id), "%s", ss->id);
			snprintf(w->model_id, sizeof(w->model_id), "%s", ss->model_id);
			snprintf(w->home, sizeof(w->home), "%s",
				 ss->home < c->n_nodes ? c->nodes[ss->home].id : "");
			w->tokens = ss->tokens;
			w->data_id = ss->data_id;
			w->home_epoch = ss->home_epoch;
			w->blocks = (uint32_t)ss->n;
			w->shared = ss->shared_prefix;
			w->degraded = ss->degraded;
		}
	pthread_mutex_unlock(&c->mu);
	int rc;
	size_t page = n < limit ? n : limit;
	Kvmesh__V1__Sequence *seqs = calloc(page ? page : 1, sizeof(*seqs));
	Kvmesh__V1__Sequence **ptrs = calloc(page ? page : 1, sizeof(*ptrs));
	if (!rows || !seqs || !ptrs) {
		rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
	} else {
		if (n > 1) /* qsort on NULL is undefined, even of 0 items */
			qsort(rows, n, sizeof(*rows), row_id_cmp);
		for (size_t i = 0; i < page; i++) { /* blocks left out: block_count */
			Kvmesh__V1__Sequence *s = &seqs[i];
			kvmesh__v1__sequence__init(s);
			s->id = rows[i].id;
			s->model_id = rows[i].model_id;
			s->home_node = rows[i].home;
			s->tokens = rows[i].tokens;
			s->data_id = rows[i].data_id;
			s->home_epoch = rows[i].home_epoch;
			s->block_count = rows[i].blocks;
			s->shared_prefix_blocks = rows[i].shared;
			s->degraded = rows[i].degraded;
			ptrs[i] = s;
		}
		Kvmesh__V1__ListSequencesResponse resp = KVMESH__V1__LIST_SEQUENCES_RESPONSE__INIT;
		resp.sequences = ptrs;
		resp.n_sequences = page;
		resp.more = n > page;
		rc = coord_reply(call, &resp.base);
	}
	free(ptrs);
	free(seqs);
	free(rows);
	kvmesh__v1__list_sequences_request__free_unpacked(r, NULL);
	return rc;
}

/* Adds a handle to the ReleaseBlocks command for `node` in rel[] (made on
 * first use, room for cap handles). Without memory the handle is skipped:
 * the holder's next full report finds it as an orphan. */
static void add_release(kvm_coord *c, cmd_rec **rel, uint32_t node, size_t cap,
			const Kvmesh__V1__BlockHandle *h)
{
	if (!rel || node >= c->n_nodes)
		return;
	if (!rel[node]) {
		cmd_rec *m = calloc(1, sizeof(*m));
		if (m)
			m->handles = calloc(cap + 1, sizeof(*m->handles));
		if (!m || !m->handles) {
			coord_cmd_free(m);
			return;
		}
		m->kind = KVMESH__V1__COMMAND__KIND_RELEASE;
		rel[node] = m;
	}
	Kvmesh__V1__BlockHandle *d = &rel[node]->handles[rel[node]->n++];
	kvmesh__v1__block_handle__init(d);
	d->slot = h->slot;
	d->generation = h->generation;
	d->tier = h->tier;
}

/* Drops one placement's reference. Returns whether its ledger count was
 * released now; a block no one references any more is queued for release on
 * its holder (when its handle is known). */
static bool unref_slot(kvm_coord *c, const char *home, const Kvmesh__V1__BlockPlacement *p,
		       soft_slot *sl, cmd_rec **rel, size_t cap)
{
	blk_ent *be = sl ? sl->be : NULL;
	if (be) {
		if (--be->refs > 0)
			return false;
		/* The last reference: the charge goes, once, from whoever made it. */
		if (be->charged && be->charge_home < c->n_nodes && be->node < c->n_nodes)
			kvm_ledger_release(c->ledger, c->nodes[be->charge_home].id,
					   c->nodes[be->node].id, 1);
		if (be->known)
			add_release(c, rel, be->node, cap, &be->h);
		coord_blk_remove(c, be);
		sl->be = NULL;
		return true;
	}
	kvm_ledger_release(c->ledger, home, p->node_id, 1);
	if (sl && sl->known)
		add_release(c, rel, sl->node, cap, &sl->h);
	return true;
}

int coord_release_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	Kvmesh__V1__ReleaseSequenceRequest *r =
		kvmesh__v1__release_sequence_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed ReleaseSequenceRequest");
	int rc;
	uint64_t ticket = 0;
	pthread_mutex_lock(&c->mu);
	Kvmesh__V1__Sequence *s = load_seq(c, r->sequence_id);
	if (!s) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown sequence \"%s\"", r->sequence_id);
	} else {
		char key[128];
		snprintf(key, sizeof(key), "seqs/%s", s->id);
		int src = kvm_state_del_async(c->st, key, &ticket);
		if (src == 0) /* any left behind are deleted at the next start */
			(void)drop_exts(c, s->id, &ticket);
		if (src != 0) {
			rc = coord_store_fail(c, call, src);
		} else {
			soft_seq *ss = coord_soft_find(c, s->id);
			/* One ReleaseBlocks per holder; a node without memory for its
			 * command gets none (its next full report finds the orphans). */
			cmd_rec **rel = calloc(c->n_nodes + 1, sizeof(*rel));
			uint32_t freed = 0;
			for (size_t i = 0; i < s->n_blocks; i++) {
				soft_slot *sl = ss && i < ss->n ? &ss->slots[i] : NULL;
				freed += unref_slot(c, s->home_node, s->blocks[i], sl, rel,
						    s->n_blocks);
			}
			for (size_t i = 0; rel && i < c->n_nodes; i++) {
				if (rel[i] && rel[i]->n)
					coord_queue_cmd(c, (uint32_t)i, rel[i]);
				else
					coord_cmd_free(rel[i]);
			}
			free(rel);
			uint32_t home = coord_node_ix(c, s->home_node);
			cmd_rec *rs = calloc(1, sizeof(*rs));
			if (rs) {
				rs->kind = KVMESH__V1__COMMAND__KIND_RELEASE_SEQUENCE;
				rs->sequence_id = strdup(s->id);
				rs->data_id = coord_data_id(s->id);
				if (rs->sequence_id)
					coord_queue_cmd(c, home, rs);
				else
					coord_cmd_free(rs);
			}
			if (ss)
				coord_soft_remove(c, ss);
			emit_seq_event(c, s->id, KVMESH__V1__SEQUENCE_EVENT__KIND__RELEASED, NULL, 0,
				       "released");
			Kvmesh__V1__ReleaseSequenceResponse resp =
				KVMESH__V1__RELEASE_SEQUENCE_RESPONSE__INIT;
			resp.freed_blocks = freed;
			rc = coord_reply(call, &resp.base);
		}
	}
	pthread_mutex_unlock(&c->mu);
	rc = coord_reply_when_durable(c, call, rc, ticket);
	if (s)
		kvmesh__v1__sequence__free_unpacked(s, NULL);
	kvmesh__v1__release_sequence_request__free_unpacked(r, NULL);
	return rc;
}

/* Switches the ledger's charges of ss's blocks from home `from` to `to`:
 * its private placements, and the shared blocks it wrote whose charge is
 * from's (shared blocks others wrote stay charged to their writers). */
static void recharge(kvm_coord *c, const Kvmesh__V1__Sequence *s, soft_seq *ss, uint32_t from,
		     uint32_t to)
{
	const char *f = c->nodes[from].id, *t = c->nodes[to].id;
	for (size_t i = 0; i < s->n_blocks; i++) {
		soft_slot *sl = i < ss->n ? &ss->slots[i] : NULL;
		blk_ent *be = sl ? sl->be : NULL;
		if (!be) {
			kvm_ledger_release(c->ledger, f, s->blocks[i]->node_id, 1);
			kvm_ledger_charge(c->ledger, t, s->blocks[i]->node_id, 1);
		} else if (be->writer == ss && be->charged && be->charge_home == from &&
			   be->node < c->n_nodes) {
			kvm_ledger_release(c->ledger, f, c->nodes[be->node].id, 1);
			kvm_ledger_charge(c->ledger, t, c->nodes[be->node].id, 1);
			be->charge_home = to;
		}
	}
}

/* Whether a drain is moving any block ss uses (its charge is in flight). */
static bool seq_moving(const soft_seq *ss)
{
	for (size_t i = 0; i < ss->n; i++)
		if (ss->slots[i].moving || (ss->slots[i].be && ss->slots[i].be->moving))
			return true;
	return false;
}

int coord_move_sequence_home(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	Kvmesh__V1__MoveSequenceHomeRequest *r =
		kvmesh__v1__move_sequence_home_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				    "malformed MoveSequenceHomeRequest");
	int rc = KVM_RPC_OK;
	uint64_t ticket = 0;
	pthread_mutex_lock(&c->mu);
	Kvmesh__V1__Sequence *s = load_seq(c, r->sequence_id);
	soft_seq *ss = s ? coord_soft_find(c, s->id) : NULL;
	uint32_t from = coord_node_ix(c, r->from_node), to = coord_node_ix(c, r->to_node);
	bool keep = strcmp(r->from_node, r->to_node) == 0; /* a take-back: bumps the epoch only */
	if (!s || !ss) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown sequence \"%s\"", r->sequence_id);
	} else if (to == NO_NODE) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown node \"%s\"", r->to_node);
	} else if (!keep && strcmp(s->home_node, r->to_node) == 0) {
		rc = KVM_RPC_OK; /* done already: a retry after a lost reply */
	} else if (strcmp(s->home_node, r->from_node) != 0 || from == NO_NODE) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION,
				  "sequence %s is homed on %s, not %s", s->id, s->home_node,
				  r->from_node);
	} else if (r->home_epoch && r->home_epoch != s->home_epoch) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION,
				  "sequence %s: home epoch %" PRIu64 ", not %" PRIu64
				  ": its home was moved or taken back since",
				  s->id, s->home_epoch, r->home_epoch);
	} else if (!keep && c->nodes[to].state != KVMESH__V1__NODE_STATE__NODE_READY) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION,
				  "node %s is %s: it takes no sequences", r->to_node,
				  coord_state_name(c->nodes[to].state));
	} else if (!keep && !kvm_ledger_models_match(c->nodes[to].model, s->model_id)) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION,
				  "node %s holds the KV of model %s, not %s", r->to_node,
				  c->nodes[to].model, s->model_id);
	} else if (!keep && seq_moving(ss)) {
		rc = kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE,
				  "blocks of sequence %s are moving; try again", s->id);
	} else {
		char *old = s->home_node;
		s->home_node = r->to_node;
		s->home_epoch++;
		int src = store_seq(c, s, true, &ticket);
		s->home_node = old;
		if (src == 0)
			ss->home_epoch = s->home_epoch;
		if (src != 0) {
			rc = coord_store_fail(c, call, src);
		} else if (keep) {
			kvm_log(KVM_LOG_INFO, "home_kept", "sequence=%s home=%s home_epoch=%" PRIu64, s->id,
				r->to_node, s->home_epoch);
		} else {
			recharge(c, s, ss, from, to);
			ss->home = to;
			ss->handoff_until_ms = 0;
			Kvmesh__V1__SequenceEvent se = KVMESH__V1__SEQUENCE_EVENT__INIT;
			se.sequence_id = s->id;
			se.kind = KVMESH__V1__SEQUENCE_EVENT__KIND__HOME_MOVED;
			se.node_id = r->to_node;
			se.reason = "the old home is draining";
			Kvmesh__V1__Event ev = KVMESH__V1__EVENT__INIT;
			ev.kind_case = KVMESH__V1__EVENT__KIND_SEQUENCE;
			ev.sequence = &se;
			coord_emit(c, &ev);
			kvm_log(KVM_LOG_INFO, "home_moved", "sequence=%s from=%s to=%s home_epoch=%" PRIu64,
				s->id, r->from_node, r->to_node, s->home_epoch);
		}
	}
	if (rc == KVM_RPC_OK) {
		Kvmesh__V1__Sequence *now = load_seq(c, r->sequence_id); /* as stored now */
		if (now) {
			overlay ov;
			overlay_apply(c, now, &ov);
			rc = coord_reply(call, &now->base);
			overlay_undo(now, &ov);
			kvmesh__v1__sequence__free_unpacked(now, NULL);
		} else {
			rc = kvm_rpc_fail(call, KVM_RPC_INTERNAL, "sequence vanished");
		}
	}
	pthread_mutex_unlock(&c->mu);
	rc = coord_reply_when_durable(c, call, rc, ticket);
	if (s)
		kvmesh__v1__sequence__free_unpacked(s, NULL);
	kvmesh__v1__move_sequence_home_request__free_unpacked(r, NULL);
	return rc;
}

/* Recovery: the models' block_tokens (a scan cannot read the store). */
typedef struct recover_ctx {
	kvm_coord *c;
	struct {
		char id[64];
		uint32_t bt;
	} *models;
	size_t n_models, cap_models;
	int err;
} recover_ctx;

static int collect_bt(void *arg, const char *key, const void *val, size_t len)
{
	(void)key;
	recover_ctx *x = arg;
	Kvmesh__V1__Model *m = kvmesh__v1__model__unpack(NULL, len, val);
	if (!m)
		return 0;
	if (x->n_models == x->cap_models) {
		size_t cap = x->cap_models ? x->cap_models * 2 : 8;
		void *p = realloc(x->models, cap * sizeof(*x->models));
		if (!p) {
			kvmesh__v1__model__free_unpacked(m, NULL);
			return -ENOMEM;
		}
		x->models = p;
		x->cap_models = cap;
	}
	snprintf(x->models[x->n_models].id, 64, "%s", m->id);
	x->models[x->n_models++].bt = m->geometry ? m->geometry->block_tokens : 0;
	kvmesh__v1__model__free_unpacked(m, NULL);
	return 0;
}

/* Charges the ledger for the blocks a stored sequence owns (not those it
 * shares), and rebuilds its soft entry and the refs of its shared blocks. */
static int recover_seq(recover_ctx *x, const char *id)
{
	kvm_coord *c = x->c;
	uint32_t base, exts;
	Kvmesh__V1__Sequence *s = load_seq_counted(c, id, &base, &exts);
	if (!s)
		return 0; /* unreadable: skipped, not fatal */
	uint32_t bt = 0;
	for (size_t i = 0; i < x->n_models; i++)
		if (strcmp(x->models[i].id, s->model_id) == 0)
			bt = x->models[i].bt;
	soft_seq *ss = coord_soft_add(c, s->id, s->home_node, s->model_id, bt);
	int rc = ss ? 0 : -ENOMEM;
	if (ss) {
		ss->degraded = s->degraded;
		ss->home_epoch = s->home_epoch;
		ss->tokens = s->tokens;
		ss->shared_prefix = s->shared_prefix_blocks;
		ss->stored_blocks = base;
		ss->ext_records = exts;
	}
	for (size_t i = 0; i < s->n_blocks && rc == 0; i++) {
		const Kvmesh__V1__BlockPlacement *p = s->blocks[i];
		bool owned = i >= s->shared_prefix_blocks;
		if (owned)
			kvm_ledger_charge(c->ledger, s->home_node, p->node_id, 1);
		rc = coord_soft_push(c, ss, p->node_id);
		kvs_key k;
		if (rc != 0 || coord_key_from(&p->key, &k) != 0)
			continue; /* unkeyed in the record: not shared */
		blk_ent *be = coord_blk_find(c, k);
		if (!be && !(be = coord_blk_add(c, k, coord_node_ix(c, p->node_id)))) {
			rc = -ENOMEM;
			break;
		}
		be->refs++;
		be->tokens = p->tokens;
		ss->slots[i].be = be;
		if (owned) {
			be->charged = true;
			be->charge_home = ss->home;
			be->writer = ss;
			be->writer_index = (uint32_t)i;
			be->writer_key_stored = true;
		} else if (!be->charged && be->charge_home == NO_NODE) {
			be->charge_home = ss->home; /* if its writer is gone: see below */
		}
	}
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return rc;
}

/* Deletes extension records whose sequence is gone (a crash inside a
 * release, between its deletes). */
static int drop_orphan_exts(kvm_coord *c)
{
	ext_list l;
	int rc = ext_load(c, "seqx/", false, &l);
	uint64_t t;
	for (size_t i = 0; rc == 0 && i < l.n; i++) {
		const char *id = l.keys[i] + 5, *end = strchr(id, '/');
		char key[128];
		snprintf(key, sizeof(key), "seqs/%.*s", end ? (int)(end - id) : 0, id);
		void *v;
		size_t len;
		int g = kvm_state_get(c->st, key, &v, &len);
		if (g == 0)
			free(v);
		else if (g == -ENOENT)
			rc = kvm_state_del_async(c->st, l.keys[i], &t);
	}
	ext_list_free(&l);
	return rc;
}

int coord_recover_sequences(kvm_coord *c)
{
	recover_ctx x = {.c = c};
	int rc = kvm_state_scan(c->st, "models/", collect_bt, &x);
	/* Ids first: a sequence's extensions are read outside the scan. */
	ext_list ids = {0};
	if (rc == 0)
		rc = ext_load(c, "seqs/", false, &ids);
	for (size_t i = 0; rc == 0 && i < ids.n; i++)
		rc = recover_seq(&x, ids.keys[i] + 5);
	ext_list_free(&ids);
	if (rc == 0)
		rc = drop_orphan_exts(c);
	/* A shared block whose writer was released is charged once, to the home
	 * of the first sequence (in key order) that still shares it. */
	for (size_t b = 0; rc == 0 && b < c->blk_buckets; b++)
		for (blk_ent *e = c->blks[b]; e; e = e->next)
			if (!e->charged && e->charge_home < c->n_nodes && e->node < c->n_nodes) {
				kvm_ledger_charge(c->ledger, c->nodes[e->charge_home].id,
						  c->nodes[e->node].id, 1);
				e->charged = true;
			}
	free(x.models);
	return rc;
}

/* Collects the ids of sequences with blocks on a node, for marking. */
typedef struct id_list {
	char (*ids)[64];
	size_t n, cap;
	const char *node;
} id_list;

/* Whether a placement's bytes are on its node: the partial tail lives at
 * the home until it fills and is sealed there. */
static bool holds_data(const Kvmesh__V1__BlockPlacement *p, uint32_t bt)
{
	return bt == 0 || p->tokens >= bt;
}

static int collect_on_node(void *arg, const char *key, const void *val, size_t len)
{
	id_list *l = arg;
	Kvmesh__V1__Sequence *s = kvmesh__v1__sequence__unpack(NULL, len, val);
	if (!s)
		return 0;
	/* (no store reads here: the scan holds the store) An extension record
	 * has no id nor home: its key "seqx/ID/FIRST" names the sequence. */
	char id[64];
	if (strncmp(key, "seqx/", 5) == 0) {
		const char *end = strchr(key + 5, '/');
		snprintf(id, sizeof(id), "%.*s", end ? (int)(end - key - 5) : 0, key + 5);
	} else {
		snprintf(id, sizeof(id), "%s", s->id);
	}
	bool on = strcmp(s->home_node, l->node) == 0;
	for (size_t i = 0; i < s->n_blocks && !on; i++)
		on = strcmp(s->blocks[i]->node_id, l->node) == 0;
	if (on && !s->degraded) {
		if (l->n == l->cap) {
			size_t cap = l->cap ? l->cap * 2 : 16;
			char(*p)[64] = realloc(l->ids, cap * sizeof(*p));
			if (!p) {
				kvmesh__v1__sequence__free_unpacked(s, NULL);
				return -ENOMEM;
			}
			l->ids = p;
			l->cap = cap;
		}
		snprintf(l->ids[l->n++], 64, "%s", id);
	}
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return 0;
}

static int cmp_id(const void *a, const void *b)
{
	return strcmp(a, b);
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

int coord_seq_set_nodes(kvm_coord *c, const char *id, const uint32_t *index, size_t n,
			const char *node, uint64_t *ticket)
{
	Kvmesh__V1__Sequence *s = load_seq(c, id);
	if (!s)
		return -ENOENT;
	/* The unpacked strings belong to protobuf-c: swap ours in to pack,
	 * then put them back for free_unpacked. */
	char **old = calloc(2 * s->n_blocks + 1, sizeof(*old));
	if (!old) {
		kvmesh__v1__sequence__free_unpacked(s, NULL);
		return -ENOMEM;
	}
	char addr[256];
	const char *data_addr = data_address_of(c, node, addr, sizeof(addr));
	size_t set = 0;
	for (size_t i = 0; i < s->n_blocks; i++) {
		Kvmesh__V1__BlockPlacement *p = s->blocks[i];
		if (!bsearch(&p->index, index, n, sizeof(*index), cmp_u32))
			continue;
		old[2 * i] = p->node_id;
		old[2 * i + 1] = p->data_address;
		p->node_id = (char *)node;
		p->data_address = (char *)data_addr;
		p->borrowed = strcmp(node, s->home_node) != 0;
		set++;
	}
	int rc = set ? store_seq(c, s, true, ticket) : -ENOENT;
	if (rc == 0) {
		char why[160];
		snprintf(why, sizeof(why), "%zu blocks moved to node %s (a drain)", n, node);
		Kvmesh__V1__SequenceEvent se = KVMESH__V1__SEQUENCE_EVENT__INIT;
		se.sequence_id = s->id;
		se.kind = KVMESH__V1__SEQUENCE_EVENT__KIND__MOVED;
		se.moved_blocks = (uint32_t *)index;
		se.n_moved_blocks = n;
		se.node_id = (char *)node;
		se.reason = why;
		Kvmesh__V1__Event ev = KVMESH__V1__EVENT__INIT;
		ev.kind_case = KVMESH__V1__EVENT__KIND_SEQUENCE;
		ev.sequence = &se;
		coord_emit(c, &ev);
	}
	for (size_t i = 0; i < s->n_blocks; i++)
		if (old[2 * i]) {
			s->blocks[i]->node_id = old[2 * i];
			s->blocks[i]->data_address = old[2 * i + 1];
		}
	free(old);
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return rc;
}

void coord_degrade(kvm_coord *c, const char *id, const uint32_t *lost, size_t n, const char *why)
{
	Kvmesh__V1__Sequence *s = load_seq(c, id);
	if (!s)
		return;
	soft_seq *ss = coord_soft_find(c, s->id);
	if (ss)
		ss->degraded = true;
	if (!s->degraded) {
		s->degraded = 1;
		c->degraded_total++;
		uint64_t ticket;
		store_seq(c, s, true, &ticket); /* made durable by the next sync or snapshot */
	}
	emit_seq_event(c, s->id, KVMESH__V1__SEQUENCE_EVENT__KIND__DEGRADED, (uint32_t *)lost, n,
		       why);
	kvm_log(KVM_LOG_WARN, "sequence_degraded", "sequence=%s lost_blocks=%zu reason=\"%s\"",
		s->id, n, why);
	kvmesh__v1__sequence__free_unpacked(s, NULL);
}

void coord_node_lost(kvm_coord *c, const char *node_id, const char *how)
{
	id_list l = {.node = node_id};
	kvm_state_scan(c->st, "seqs/", collect_on_node, &l);
	kvm_state_scan(c->st, "seqx/", collect_on_node, &l);
	if (l.n > 1) /* once each, though found in several records */
		qsort(l.ids, l.n, sizeof(*l.ids), cmp_id);
	for (size_t i = 0; i < l.n; i++) {
		if (i > 0 && strcmp(l.ids[i], l.ids[i - 1]) == 0)
			continue;
		Kvmesh__V1__Sequence *s = load_seq(c, l.ids[i]);
		if (!s || s->degraded) {
			if (s)
				kvmesh__v1__sequence__free_unpacked(s, NULL);
			continue;
		}
		uint32_t *lost = calloc(s->n_blocks + 1, sizeof(uint32_t));
		size_t n = 0;
		uint32_t bt = block_tokens_of(c, s->model_id);
		for (size_t b = 0; lost && b < s->n_blocks; b++)
			if (strcmp(s->blocks[b]->node_id, node_id) == 0 && holds_data(s->blocks[b], bt))
				lost[n++] = s->blocks[b]->index;
		bool home = strcmp(s->home_node, node_id) == 0;
		char why[200];
		if (home)
			snprintf(why, sizeof(why),
				 "its home %s %s: the tokens after its last full block were there%s", node_id,
				 how, n ? ", and blocks" : "");
		else
			snprintf(why, sizeof(why), "%zu blocks were on node %s, which %s", n, node_id, how);
		/* Neither: only the placement of a tail not written yet was there. */
		if (n || home || !lost)
			coord_degrade(c, s->id, lost, n, why);
		free(lost);
		kvmesh__v1__sequence__free_unpacked(s, NULL);
	}
	free(l.ids);
}
