/* Sequences and block placement: CreateSequence, ExtendSequence,
 * GetSequence, ReleaseSequence.
 *
 * A sequence is a durable record "seqs/ID" (a packed kvmesh.v1.Sequence:
 * model, home node, token count, and for each block index the node that
 * holds it). Where new blocks go is the ledger's decision: the home node
 * while it has room, then creditors ranked by link bandwidth within their
 * lending caps. Block handles are not stored: they belong to the agents and
 * come back as soft state with block reports (still to come, with prefix
 * sharing). At start, the ledger's reservations are rebuilt from the stored
 * sequences. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "coordinator/coord_impl.h"

#define MAX_GRANTS 64

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

static Kvmesh__V1__Sequence *load_seq(kvm_coord *c, const char *id)
{
	char key[128];
	snprintf(key, sizeof(key), "seqs/%s", id);
	void *v;
	size_t len;
	if (kvm_state_get(c->st, key, &v, &len) != 0)
		return NULL;
	Kvmesh__V1__Sequence *s = kvmesh__v1__sequence__unpack(NULL, len, v);
	free(v);
	return s;
}

/* Appends the record; *ticket is what kvm_state_sync must see durable before
 * the change is acknowledged (done outside c->mu, so that concurrent calls
 * share one fsync). */
static int store_seq(kvm_coord *c, const Kvmesh__V1__Sequence *s, uint64_t *ticket)
{
	char key[128];
	snprintf(key, sizeof(key), "seqs/%s", s->id);
	size_t n = kvmesh__v1__sequence__get_packed_size(s);
	uint8_t *buf = malloc(n ? n : 1);
	if (!buf)
		return -ENOMEM;
	kvmesh__v1__sequence__pack(s, buf);
	int rc = kvm_state_put_async(c->st, key, buf, n, ticket);
	free(buf);
	return rc;
}

/* Waits for the change to be durable; on failure the call fails (the
 * response set under the lock is then not sent). */
static int durable(kvm_coord *c, kvm_rpc_call *call, int rc, uint64_t ticket)
{
	if (rc != KVM_RPC_OK || ticket == 0)
		return rc;
	int src = kvm_state_sync(c->st, ticket);
	return src == 0 ? rc
			: kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE, "state store: %s", strerror(-src));
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

/* Picks a home: the ready node with the most free blocks; mu held. */
static const char *pick_home(kvm_coord *c)
{
	const char *best = NULL;
	uint64_t best_free = 0;
	for (size_t i = 0; i < c->n_nodes; i++) {
		kvm_ledger_node ln;
		if (c->nodes[i].state != KVMESH__V1__NODE_STATE__NODE_READY ||
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
	const char *home = r->home_node[0] ? r->home_node : pick_home(c);
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
		rc = kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE, "no ready node to be the home node");
	} else if (!hn) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown home node \"%s\"", home);
	} else if (hn->state == KVMESH__V1__NODE_STATE__NODE_DEAD) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION, "home node %s is dead", home);
	} else {
		uint64_t tokens = r->n_prompt_tokens;
		uint64_t blocks = (tokens + bt - 1) / bt;
		new_blocks nb;
		int prc = place(c, home, 0, blocks, &nb);
		if (prc != 0) {
			rc = kvm_rpc_fail(call, prc == -ENOSPC ? KVM_RPC_RESOURCE_EXHAUSTED
							       : KVM_RPC_FAILED_PRECONDITION,
					  "sequence %s: %" PRIu64 " blocks: %s", id, blocks,
					  place_error(prc));
		} else {
			Kvmesh__V1__Sequence s = KVMESH__V1__SEQUENCE__INIT;
			s.id = id;
			s.model_id = r->model_id;
			s.home_node = (char *)home;
			s.tokens = tokens;
			s.n_blocks = nb.n;
			s.blocks = nb.ptrs;
			set_block_tokens(nb.ptrs, nb.n, tokens, bt);
			int src = store_seq(c, &s, &ticket);
			if (src != 0) {
				for (size_t i = 0; i < nb.n; i++)
					kvm_ledger_release(c->ledger, home, nb.p[i].node_id, 1);
				rc = kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE, "state store: %s",
						  strerror(-src));
			} else {
				emit_seq_event(c, id, KVMESH__V1__SEQUENCE_EVENT__KIND__CREATED, NULL, 0,
					       "created");
				rc = coord_reply(call, &s.base);
			}
			free_new_blocks(&nb);
		}
	}
	pthread_mutex_unlock(&c->mu);
	rc = durable(c, call, rc, ticket);
	if (old)
		kvmesh__v1__sequence__free_unpacked(old, NULL);
	kvmesh__v1__create_sequence_request__free_unpacked(r, NULL);
	return rc;
}

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
	Kvmesh__V1__Sequence *s = load_seq(c, r->sequence_id);
	uint32_t bt = s ? block_tokens_of(c, s->model_id) : 0;
	if (!s) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown sequence \"%s\"", r->sequence_id);
	} else if (bt == 0) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION, "model %s of sequence %s is gone",
				  s->model_id, s->id);
	} else if (r->tokens == 0 || r->tokens > (1u << 26)) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				  "tokens must be 1..%u, not %u", 1u << 26, r->tokens);
	} else if (s->degraded) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION,
				  "sequence %s is degraded (blocks lost with a dead node)", s->id);
	} else {
		uint64_t tokens = s->tokens + r->tokens;
		uint64_t have = s->n_blocks, want = (tokens + bt - 1) / bt;
		new_blocks nb;
		int prc = place(c, s->home_node, (uint32_t)have, want - have, &nb);
		if (prc != 0) {
			rc = kvm_rpc_fail(call, prc == -ENOSPC ? KVM_RPC_RESOURCE_EXHAUSTED
							       : KVM_RPC_FAILED_PRECONDITION,
					  "sequence %s: %" PRIu64 " more blocks: %s", s->id,
					  want - have, place_error(prc));
		} else {
			/* The stored blocks plus the new ones, as one list. */
			Kvmesh__V1__BlockPlacement **all = calloc(have + nb.n + 1, sizeof(*all));
			Kvmesh__V1__BlockPlacement **saved = s->blocks;
			size_t saved_n = s->n_blocks;
			if (!all) {
				rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
			} else {
				if (have) /* a fresh sequence has no array (memcpy from NULL is UB) */
					memcpy(all, s->blocks, have * sizeof(*all));
				memcpy(all + have, nb.ptrs, nb.n * sizeof(*all));
				s->blocks = all;
				s->n_blocks = have + nb.n;
				s->tokens = tokens;
				set_block_tokens(all, s->n_blocks, tokens, bt);
				int src = store_seq(c, s, &ticket);
				if (src != 0) {
					for (size_t i = 0; i < nb.n; i++)
						kvm_ledger_release(c->ledger, s->home_node,
								   nb.p[i].node_id, 1);
					rc = kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE, "state store: %s",
							  strerror(-src));
				} else {
					emit_seq_event(c, s->id,
						       KVMESH__V1__SEQUENCE_EVENT__KIND__EXTENDED, NULL,
						       0, "extended");
					Kvmesh__V1__ExtendSequenceResponse resp =
						KVMESH__V1__EXTEND_SEQUENCE_RESPONSE__INIT;
					resp.n_new_blocks = nb.n;
					resp.new_blocks = nb.ptrs;
					resp.sequence = s;
					rc = coord_reply(call, &resp.base);
				}
				s->blocks = saved; /* give protobuf-c back its own array */
				s->n_blocks = saved_n;
				free(all);
			}
			free_new_blocks(&nb);
		}
	}
	pthread_mutex_unlock(&c->mu);
	rc = durable(c, call, rc, ticket);
	if (s)
		kvmesh__v1__sequence__free_unpacked(s, NULL);
	kvmesh__v1__extend_sequence_request__free_unpacked(r, NULL);
	return rc;
}

int coord_get_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	Kvmesh__V1__GetSequenceRequest *r = kvmesh__v1__get_sequence_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed GetSequenceRequest");
	pthread_mutex_lock(&c->mu);
	Kvmesh__V1__Sequence *s = load_seq(c, r->sequence_id);
	int rc = s ? coord_reply(call, &s->base)
		   : kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown sequence \"%s\"", r->sequence_id);
	pthread_mutex_unlock(&c->mu);
	if (s)
		kvmesh__v1__sequence__free_unpacked(s, NULL);
	kvmesh__v1__get_sequence_request__free_unpacked(r, NULL);
	return rc;
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
		if (src != 0) {
			rc = kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE, "state store: %s", strerror(-src));
		} else {
			for (size_t i = 0; i < s->n_blocks; i++)
				kvm_ledger_release(c->ledger, s->home_node, s->blocks[i]->node_id, 1);
			emit_seq_event(c, s->id, KVMESH__V1__SEQUENCE_EVENT__KIND__RELEASED, NULL, 0,
				       "released");
			Kvmesh__V1__ReleaseSequenceResponse resp =
				KVMESH__V1__RELEASE_SEQUENCE_RESPONSE__INIT;
			resp.freed_blocks = (uint32_t)s->n_blocks;
			rc = coord_reply(call, &resp.base);
		}
	}
	pthread_mutex_unlock(&c->mu);
	rc = durable(c, call, rc, ticket);
	if (s)
		kvmesh__v1__sequence__free_unpacked(s, NULL);
	kvmesh__v1__release_sequence_request__free_unpacked(r, NULL);
	return rc;
}

static int charge_seq(void *arg, const char *key, const void *val, size_t len)
{
	(void)key;
	kvm_coord *c = arg;
	Kvmesh__V1__Sequence *s = kvmesh__v1__sequence__unpack(NULL, len, val);
	if (!s)
		return 0; /* unreadable: skipped, not fatal */
	for (size_t i = 0; i < s->n_blocks; i++)
		kvm_ledger_charge(c->ledger, s->home_node, s->blocks[i]->node_id, 1);
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return 0;
}

int coord_recover_sequences(kvm_coord *c)
{
	return kvm_state_scan(c->st, "seqs/", charge_seq, c);
}

/* Collects the ids of sequences with blocks on a node, for marking. */
typedef struct id_list {
	char (*ids)[64];
	size_t n, cap;
	const char *node;
} id_list;

static int collect_on_node(void *arg, const char *key, const void *val, size_t len)
{
	(void)key;
	id_list *l = arg;
	Kvmesh__V1__Sequence *s = kvmesh__v1__sequence__unpack(NULL, len, val);
	if (!s)
		return 0;
	bool on = false;
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
		snprintf(l->ids[l->n++], 64, "%s", s->id);
	}
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return 0;
}

void coord_node_lost(kvm_coord *c, const char *node_id)
{
	id_list l = {.node = node_id};
	kvm_state_scan(c->st, "seqs/", collect_on_node, &l);
	for (size_t i = 0; i < l.n; i++) {
		Kvmesh__V1__Sequence *s = load_seq(c, l.ids[i]);
		if (!s)
			continue;
		uint32_t *lost = calloc(s->n_blocks + 1, sizeof(uint32_t));
		size_t n = 0;
		for (size_t b = 0; lost && b < s->n_blocks; b++)
			if (strcmp(s->blocks[b]->node_id, node_id) == 0)
				lost[n++] = s->blocks[b]->index;
		s->degraded = 1;
		uint64_t ticket;
		store_seq(c, s, &ticket); /* made durable by the next sync or snapshot */
		char why[160];
		snprintf(why, sizeof(why), "%zu blocks were on node %s, which died", n, node_id);
		emit_seq_event(c, s->id, KVMESH__V1__SEQUENCE_EVENT__KIND__DEGRADED, lost, n, why);
		kvm_log(KVM_LOG_WARN, "sequence_degraded", "sequence=%s node=%s lost_blocks=%zu", s->id,
			node_id, n);
		free(lost);
		kvmesh__v1__sequence__free_unpacked(s, NULL);
	}
	free(l.ids);
}
