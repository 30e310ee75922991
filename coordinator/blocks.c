/* The cluster block index (soft state): which handle holds each placement
 * of a live sequence, the prefix index of keyed full blocks with their
 * reference counts, block reports that fill them, and the per-node command
 * queues that heartbeat responses carry.
 *
 * None of this is in the durable store: handles come back from the agents'
 * full reports after a coordinator restart (as HDFS rebuilds its block map).
 * What prefix sharing needs durably (the keys and nodes of shared
 * placements) is in the sequences' records; refs are rebuilt from those by
 * coord_recover_sequences. Everything here runs with c->mu held. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "common/log.h"
#include "coordinator/coord_impl.h"

uint64_t coord_data_id(const char *id)
{
	return XXH3_64bits(id, strlen(id));
}

uint64_t coord_model_hash(const char *model_id)
{
	return XXH3_64bits(model_id, strlen(model_id));
}

uint32_t coord_node_ix(kvm_coord *c, const char *id)
{
	for (size_t i = 0; i < c->n_nodes; i++)
		if (strcmp(c->nodes[i].id, id) == 0)
			return (uint32_t)i;
	return NO_NODE;
}

/* A key from its 16-byte proto form (kvs_key_from_bytes); -EINVAL for
 * another length. */
int coord_key_from(const ProtobufCBinaryData *b, kvs_key *out)
{
	if (b->len != 16)
		return -EINVAL;
	*out = kvs_key_from_bytes(b->data);
	return 0;
}

/* ---- Hash tables (chained, power-of-two buckets, grown at load 1) ------------ */

static int grow(void ***buckets, size_t *nb, size_t n, size_t next_off,
		uint64_t (*hash)(const void *))
{
	if (n < *nb)
		return 0;
	size_t cap = *nb ? *nb * 2 : 64;
	void **nbk = calloc(cap, sizeof(*nbk));
	if (!nbk)
		return -ENOMEM;
	for (size_t i = 0; i < *nb; i++) {
		void *e = (*buckets)[i];
		while (e) {
			void **nextp = (void **)((char *)e + next_off);
			void *nx = *nextp;
			size_t b = hash(e) & (cap - 1);
			*nextp = nbk[b];
			nbk[b] = e;
			e = nx;
		}
	}
	free(*buckets);
	*buckets = nbk;
	*nb = cap;
	return 0;
}

static uint64_t seq_hash(const void *e)
{
	return ((const soft_seq *)e)->data_id;
}

static uint64_t blk_hash(const void *e)
{
	return ((const blk_ent *)e)->key.lo;
}

soft_seq *coord_soft_find_data(kvm_coord *c, uint64_t data_id)
{
	if (!c->seq_buckets)
		return NULL;
	for (soft_seq *s = c->seqs[data_id & (c->seq_buckets - 1)]; s; s = s->next)
		if (s->data_id == data_id)
			return s;
	return NULL;
}

soft_seq *coord_soft_find(kvm_coord *c, const char *id)
{
	uint64_t d = coord_data_id(id);
	if (!c->seq_buckets)
		return NULL;
	for (soft_seq *s = c->seqs[d & (c->seq_buckets - 1)]; s; s = s->next)
		if (s->data_id == d && strcmp(s->id, id) == 0)
			return s;
	return NULL;
}

soft_seq *coord_soft_add(kvm_coord *c, const char *id, const char *home, const char *model_id,
			 uint32_t bt)
{
	if (grow((void ***)&c->seqs, &c->seq_buckets, c->n_seqs, offsetof(soft_seq, next),
		 seq_hash) != 0)
		return NULL;
	soft_seq *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	snprintf(s->id, sizeof(s->id), "%s", id);
	s->home_epoch = 1;
	snprintf(s->model_id, sizeof(s->model_id), "%s", model_id);
	s->data_id = coord_data_id(id);
	s->home = coord_node_ix(c, home);
	s->model = coord_model_hash(model_id);
	s->bt = bt;
	size_t b = s->data_id & (c->seq_buckets - 1);
	s->next = c->seqs[b];
	c->seqs[b] = s;
	c->n_seqs++;
	return s;
}

int coord_soft_push(kvm_coord *c, soft_seq *ss, const char *node)
{
	if (ss->n == ss->cap) {
		size_t cap = ss->cap ? ss->cap * 2 : 8;
		soft_slot *p = realloc(ss->slots, cap * sizeof(*p));
		if (!p)
			return -ENOMEM;
		ss->slots = p;
		ss->cap = cap;
	}
	soft_slot *sl = &ss->slots[ss->n++];
	memset(sl, 0, sizeof(*sl));
	sl->node = coord_node_ix(c, node);
	kvmesh__v1__block_handle__init(&sl->h);
	return 0;
}

void coord_soft_remove(kvm_coord *c, soft_seq *ss)
{
	coord_moves_seq_gone(c, ss->data_id);
	soft_seq **pp = &c->seqs[ss->data_id & (c->seq_buckets - 1)];
	while (*pp && *pp != ss)
		pp = &(*pp)->next;
	if (*pp)
		*pp = ss->next;
	c->n_seqs--;
	for (size_t i = 0; i < ss->n; i++)
		if (ss->slots[i].be && ss->slots[i].be->writer == ss)
			ss->slots[i].be->writer = NULL;
	free(ss->slots);
	free(ss);
}

blk_ent *coord_blk_find(kvm_coord *c, kvs_key key)
{
	if (!c->blk_buckets)
		return NULL;
	for (blk_ent *e = c->blks[key.lo & (c->blk_buckets - 1)]; e; e = e->next)
		if (kvs_key_eq(e->key, key))
			return e;
	return NULL;
}

blk_ent *coord_blk_add(kvm_coord *c, kvs_key key, uint32_t node)
{
	if (grow((void ***)&c->blks, &c->blk_buckets, c->n_blks, offsetof(blk_ent, next),
		 blk_hash) != 0)
		return NULL;
	blk_ent *e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	e->key = key;
	e->node = node;
	e->charge_home = NO_NODE;
	kvmesh__v1__block_handle__init(&e->h);
	size_t b = key.lo & (c->blk_buckets - 1);
	e->next = c->blks[b];
	c->blks[b] = e;
	c->n_blks++;
	return e;
}

void coord_blk_remove(kvm_coord *c, blk_ent *be)
{
	blk_ent **pp = &c->blks[be->key.lo & (c->blk_buckets - 1)];
	while (*pp && *pp != be)
		pp = &(*pp)->next;
	if (*pp)
		*pp = be->next;
	c->n_blks--;
	free(be);
}

uint32_t coord_match_run(kvm_coord *c, uint64_t model, uint32_t bt, const uint32_t *tokens,
			 size_t n, blk_ent **out, uint32_t cap)
{
	kvs_key k = KVS_KEY_ROOT;
	uint32_t got = 0;
	for (size_t off = 0; bt && off + bt <= n && got < cap; off += bt) {
		k = kvs_key_chain(k, model, tokens + off, bt);
		blk_ent *be = coord_blk_find(c, k);
		/* Only blocks with a live handle: a sharer must be able to read it. */
		if (!be || !be->known || be->node >= c->n_nodes ||
		    c->nodes[be->node].state == KVMESH__V1__NODE_STATE__NODE_DEAD)
			break;
		out[got++] = be;
	}
	return got;
}

/* ---- Commands ------------------------------------------------------------------ */

void coord_cmd_free(cmd_rec *cmd)
{
	if (!cmd)
		return;
	free(cmd->sequence_id);
	free(cmd->handles);
	free(cmd->moves);
	free(cmd);
}

void coord_queue_cmd(kvm_coord *c, uint32_t node, cmd_rec *cmd)
{
	if (!cmd)
		return;
	if (node >= c->n_nodes || c->nodes[node].state == KVMESH__V1__NODE_STATE__NODE_DEAD) {
		coord_cmd_free(cmd); /* a dead node's blocks and tails are gone anyway */
		return;
	}
	node_rec *nd = &c->nodes[node];
	if (nd->n_cmds >= CMD_QUEUE_MAX) {
		/* One line per 1024 drops: a silent node must not flood the log. */
		if (nd->cmds_dropped++ % 1024 == 0)
			kvm_log(KVM_LOG_WARN, "commands_dropped", "node=%s queued=%zu dropped=%" PRIu64,
				nd->id, nd->n_cmds, nd->cmds_dropped);
		coord_cmd_free(cmd);
		return;
	}
	cmd->next = NULL;
	if (nd->cmd_tail)
		nd->cmd_tail->next = cmd;
	else
		nd->cmd_head = cmd;
	nd->cmd_tail = cmd;
	nd->n_cmds++;
}

static void drop_queue(node_rec *nd)
{
	while (nd->cmd_head) {
		cmd_rec *nx = nd->cmd_head->next;
		coord_cmd_free(nd->cmd_head);
		nd->cmd_head = nx;
	}
	nd->cmd_tail = NULL;
	nd->n_cmds = 0;
}

void coord_soft_node_lost(kvm_coord *c, uint32_t node)
{
	if (node >= c->n_nodes)
		return;
	drop_queue(&c->nodes[node]);
	coord_moves_node_lost(c, node);
	c->nodes[node].full_open = false;
	for (size_t b = 0; b < c->blk_buckets; b++)
		for (blk_ent *e = c->blks[b]; e; e = e->next)
			if (e->node == node)
				e->known = false;
	for (size_t b = 0; b < c->seq_buckets; b++)
		for (soft_seq *s = c->seqs[b]; s; s = s->next)
			for (size_t i = 0; i < s->n; i++)
				if (s->slots[i].node == node)
					s->slots[i].known = false;
}

void coord_soft_destroy(kvm_coord *c)
{
	for (size_t i = 0; i < c->n_nodes; i++)
		drop_queue(&c->nodes[i]);
	for (size_t b = 0; b < c->seq_buckets; b++)
		while (c->seqs[b]) {
			soft_seq *nx = c->seqs[b]->next;
			free(c->seqs[b]->slots);
			free(c->seqs[b]);
			c->seqs[b] = nx;
		}
	for (size_t b = 0; b < c->blk_buckets; b++)
		while (c->blks[b]) {
			blk_ent *nx = c->blks[b]->next;
			free(c->blks[b]);
			c->blks[b] = nx;
		}
	free(c->seqs);
	free(c->blks);
	coord_moves_destroy(c);
}

/* ---- ReportBlocks ------------------------------------------------------------------ */

static void set_handle(Kvmesh__V1__BlockHandle *dst, const Kvmesh__V1__BlockHandle *src)
{
	dst->slot = src->slot;
	dst->generation = src->generation;
	dst->tier = src->tier;
}

/* Why a report entry is refused, or NULL. Checked for every entry before any
 * is applied, so that a bad report changes nothing. */
static const char *check_report(kvm_coord *c, const Kvmesh__V1__BlockReport *b)
{
	if (!b->handle)
		return "handle is required";
	if (b->key.len != 0 && b->key.len != 16)
		return "key must be 16 bytes (or empty for an unkeyed block)";
	if (!b->sequence_id[0])
		return "sequence_id is required";
	soft_seq *s = coord_soft_find(c, b->sequence_id);
	if (!s)
		return NULL; /* an orphan: released, not refused */
	if (b->index >= s->n)
		return "index is past the sequence's placements";
	if (b->tokens > s->bt)
		return "tokens is more than the model's block_tokens";
	if (b->model_id[0] && strcmp(b->model_id, s->model_id) != 0)
		return "model_id is not the sequence's model";
	return NULL;
}

typedef struct lost_list {
	uint32_t *idx;
	size_t n, cap;
} lost_list;

static void lost_add(lost_list *l, uint32_t i)
{
	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 8;
		uint32_t *p = realloc(l->idx, cap * sizeof(*p));
		if (!p)
			return; /* the event then lists fewer blocks; the state is right */
		l->idx = p;
		l->cap = cap;
	}
	l->idx[l->n++] = i;
}

/* The end of a full report: the node's entries it did not name leave the
 * index, and the sequences that used them are degraded. */
static void sweep_full(kvm_coord *c, uint32_t node)
{
	uint32_t gen = c->nodes[node].report_gen;
	for (size_t b = 0; b < c->blk_buckets; b++)
		for (blk_ent *e = c->blks[b]; e; e = e->next)
			if (e->node == node && e->known && e->mark != gen) {
				e->known = false;
				e->dropped = true;
			}
	size_t n_degraded = 0;
	for (size_t b = 0; b < c->seq_buckets; b++)
		for (soft_seq *s = c->seqs[b]; s; s = s->next) {
			lost_list l = {0};
			for (size_t i = 0; i < s->n; i++) {
				soft_slot *sl = &s->slots[i];
				if (sl->be ? sl->be->dropped
					   : (sl->node == node && sl->known && sl->mark != gen)) {
					sl->known = false;
					lost_add(&l, (uint32_t)i);
				}
			}
			if (l.n) {
				char why[160];
				snprintf(why, sizeof(why),
					 "%zu blocks were missing from node %s's full block report", l.n,
					 c->nodes[node].id);
				coord_degrade(c, s->id, l.idx, l.n, why);
				n_degraded++;
			}
			free(l.idx);
		}
	for (size_t b = 0; b < c->blk_buckets; b++)
		for (blk_ent *e = c->blks[b]; e; e = e->next)
			e->dropped = false;
	kvm_log(KVM_LOG_INFO, "full_report", "node=%s degraded_sequences=%zu", c->nodes[node].id,
		n_degraded);
}

/* Applies one checked entry; an orphan's handle goes to `orphans`. */
static void apply_report(kvm_coord *c, uint32_t node, const Kvmesh__V1__BlockReport *b,
			 cmd_rec *orphans, moved_list *moved, uint64_t *ticket, cmd_rec **staged)
{
	uint32_t gen = c->nodes[node].report_gen;
	soft_seq *s = coord_soft_find(c, b->sequence_id);
	soft_slot *sl = s && b->index < s->n ? &s->slots[b->index] : NULL;
	blk_ent *be = sl ? sl->be : NULL;
	if (sl && (be ? be->node : sl->node) != node && coord_move_done(c, node, s, b->index, b, moved, ticket, staged))
		return;
	if (!sl || (be ? be->node : sl->node) != node) {
		kvmesh__v1__block_handle__init(&orphans->handles[orphans->n]);
		set_handle(&orphans->handles[orphans->n++], b->handle);
		return;
	}
	uint32_t tokens = b->tokens ? b->tokens : s->bt;
	if (be) { /* a shared block: its handle lives in the prefix index */
		set_handle(&be->h, b->handle);
		be->tokens = tokens;
		be->known = true;
		be->mark = gen;
		return;
	}
	set_handle(&sl->h, b->handle);
	sl->tokens = tokens;
	sl->known = true;
	sl->mark = gen;
	kvs_key k;
	if (coord_key_from(&b->key, &k) != 0)
		return;
	sl->keyed = true;
	sl->key = k;
	/* The first block reported under a key enters the prefix index; an equal
	 * block written independently stays private to its sequence. */
	if (coord_blk_find(c, k))
		return;
	be = coord_blk_add(c, k, node);
	if (!be)
		return; /* no sharing for it; the placement keeps its handle */
	set_handle(&be->h, b->handle);
	be->tokens = tokens;
	be->known = true;
	be->mark = gen;
	be->refs = 1;
	be->charged = true; /* by the writer's own placement */
	be->charge_home = s->home;
	be->writer = s;
	be->writer_index = b->index;
	sl->be = be;
}

int coord_report_blocks(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	Kvmesh__V1__ReportBlocksRequest *r =
		kvmesh__v1__report_blocks_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed ReportBlocksRequest");
	int rc = KVM_RPC_OK;
	uint64_t ticket = 0;
	cmd_rec *staged = NULL; /* releases of moved blocks' old copies */
	moved_list moved = {0};  /* their sequences' records to rewrite */
	cmd_rec *orphans = calloc(1, sizeof(*orphans));
	if (orphans)
		orphans->handles = calloc(r->n_blocks + 1, sizeof(*orphans->handles));
	if (!orphans || !orphans->handles) {
		coord_cmd_free(orphans);
		kvmesh__v1__report_blocks_request__free_unpacked(r, NULL);
		return kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
	}
	orphans->kind = KVMESH__V1__COMMAND__KIND_RELEASE;
	pthread_mutex_lock(&c->mu);
	uint32_t node = coord_node_ix(c, r->node_id);
	node_rec *nd = node == NO_NODE ? NULL : &c->nodes[node];
	if (!nd) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown node \"%s\": register first",
				  r->node_id);
		goto out;
	}
	if (r->epoch != nd->epoch) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION,
				  "node %s: epoch %llu is not the current %llu: register again",
				  r->node_id, (unsigned long long)r->epoch,
				  (unsigned long long)nd->epoch);
		goto out;
	}
	if (nd->state == KVMESH__V1__NODE_STATE__NODE_DEAD) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION,
				  "node %s was declared dead: register again", r->node_id);
		goto out;
	}
	for (size_t i = 0; i < r->n_blocks; i++) {
		const char *why = check_report(c, r->blocks[i]);
		if (why) {
			rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
					  "node %s: block report %zu (sequence \"%s\" index %u): %s",
					  r->node_id, i, r->blocks[i]->sequence_id,
					  r->blocks[i]->index, why);
			goto out;
		}
	}
	if (!r->incremental && !nd->full_open) { /* the first message of a full report */
		nd->full_open = true;
		nd->report_gen++;
	}
	for (size_t i = 0; i < r->n_blocks; i++)
		apply_report(c, node, r->blocks[i], orphans, &moved, &ticket, &staged);
	coord_moved_flush(c, node, &moved, &ticket);
	if (orphans->n) {
		kvm_log(KVM_LOG_INFO, "orphan_blocks", "node=%s blocks=%zu", nd->id, orphans->n);
		coord_queue_cmd(c, node, orphans);
		orphans = NULL;
	}
	if (!r->incremental && r->last) {
		nd->full_open = false;
		nd->reported = true;
		sweep_full(c, node);
	}
	rc = KVM_RPC_OK;
out:
	pthread_mutex_unlock(&c->mu);
	coord_cmd_free(orphans);
	if (staged) {
		/* A moved block's old copy goes only once its new place is durable. */
		int src = ticket ? kvm_state_sync(c->st, ticket) : 0;
		pthread_mutex_lock(&c->mu);
		while (staged) {
			cmd_rec *nx = staged->next;
			if (src == 0)
				coord_queue_cmd(c, staged->to, staged);
			else
				coord_cmd_free(staged);
			staged = nx;
		}
		pthread_mutex_unlock(&c->mu);
	}
	if (rc == KVM_RPC_OK) {
		Kvmesh__V1__ReportBlocksResponse resp = KVMESH__V1__REPORT_BLOCKS_RESPONSE__INIT;
		rc = coord_reply(call, &resp.base);
	}
	kvmesh__v1__report_blocks_request__free_unpacked(r, NULL);
	return rc;
}

/* ---- MatchPrefix ----------------------------------------------------------------------- */

int coord_match_prefix(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	Kvmesh__V1__MatchPrefixRequest *r = kvmesh__v1__match_prefix_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed MatchPrefixRequest");
	int rc;
	char key[128];
	snprintf(key, sizeof(key), "models/%s", r->model_id);
	void *v = NULL;
	size_t vlen = 0;
	uint32_t bt = 0;
	if (kvm_state_get(c->st, key, &v, &vlen) == 0) {
		Kvmesh__V1__Model *m = kvmesh__v1__model__unpack(NULL, vlen, v);
		bt = m && m->geometry ? m->geometry->block_tokens : 0;
		if (m)
			kvmesh__v1__model__free_unpacked(m, NULL);
		free(v);
	}
	if (bt == 0) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown model \"%s\"", r->model_id);
		kvmesh__v1__match_prefix_request__free_unpacked(r, NULL);
		return rc;
	}
	uint32_t cap = (uint32_t)(r->n_tokens / bt);
	blk_ent **run = calloc(cap + 1, sizeof(*run));
	Kvmesh__V1__BlockPlacement *p = calloc(cap + 1, sizeof(*p));
	Kvmesh__V1__BlockPlacement **pp = calloc(cap + 1, sizeof(*pp));
	Kvmesh__V1__BlockHandle *h = calloc(cap + 1, sizeof(*h));
	uint8_t(*kb)[16] = calloc(cap + 1, sizeof(*kb));
	char **addr = calloc(cap + 1, sizeof(*addr));
	if (!run || !p || !pp || !h || !kb || !addr) {
		rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto done;
	}
	pthread_mutex_lock(&c->mu);
	uint32_t k = coord_match_run(c, coord_model_hash(r->model_id), bt, r->tokens, r->n_tokens,
				     run, cap);
	for (uint32_t i = 0; i < k; i++) {
		node_rec *nd = &c->nodes[run[i]->node];
		kvmesh__v1__block_placement__init(&p[i]);
		kvmesh__v1__block_handle__init(&h[i]);
		set_handle(&h[i], &run[i]->h);
		kvs_key_to_bytes(run[i]->key, kb[i]);
		Kvmesh__V1__Node *reg = kvmesh__v1__node__unpack(NULL, nd->reg_len, nd->reg);
		addr[i] = strdup(reg ? reg->data_address : "");
		if (reg)
			kvmesh__v1__node__free_unpacked(reg, NULL);
		p[i].index = i;
		p[i].node_id = nd->id;
		p[i].data_address = addr[i] ? addr[i] : "";
		p[i].handle = &h[i];
		p[i].key.data = kb[i];
		p[i].key.len = 16;
		p[i].tokens = run[i]->tokens;
		pp[i] = &p[i];
	}
	Kvmesh__V1__MatchPrefixResponse resp = KVMESH__V1__MATCH_PREFIX_RESPONSE__INIT;
	resp.matched_blocks = k;
	resp.matched_tokens = (uint64_t)k * bt;
	resp.n_blocks = k;
	resp.blocks = pp;
	rc = coord_reply(call, &resp.base); /* under mu: node ids point into c->nodes */
	pthread_mutex_unlock(&c->mu);
	for (uint32_t i = 0; i < k; i++)
		free(addr[i]);
done:
	free(run);
	free(p);
	free(pp);
	free(h);
	free(kb);
	free(addr);
	kvmesh__v1__match_prefix_request__free_unpacked(r, NULL);
	return rc;
}
