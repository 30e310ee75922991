/* Draining a node: the blocks that other nodes' sequences keep on it move
 * to nodes the ledger picks, so that the node can leave without degrading
 * those sequences.
 *
 * On each heartbeat of a draining node (and when the drain starts), every
 * block there that a sequence homed elsewhere uses (its private placement,
 * or a prefix-index block it shares) and that is not moving yet gets a
 * reservation on a target, as a new block of that sequence would
 * (kvm_ledger_reserve for its home; the draining node is not schedulable),
 * and goes into a MoveBlocks command for the draining node, which copies it
 * with the target's Agent.PutBlocks. The target reports the block before it
 * answers; that report (coord_move_done) switches the placement: soft
 * state, the ledger (the old charge goes), the sequences' durable records,
 * then a ReleaseBlocks for the old copy. Home agents learn the new place when
 * an ATTEND on the old one fails: they fetch the sequence again and retry.
 *
 * A move not reported within MOVE_TIMEOUT_MS is given up (its reservation
 * returned) and planned again.
 *
 * Sequences homed on the draining node are handed off: a HandOff command
 * names a new home (the ready node with the most free blocks, less the
 * sequences given to it in the same step, so they spread); the draining
 * agent stops taking appends for the sequence and sends its tail to the new
 * home (Agent.AdoptSequence), which makes itself the home with
 * MoveSequenceHome (sequences.c): the record and the ledger's charges switch
 * to it. From then on the sequence's blocks on the draining node are blocks
 * of a sequence homed elsewhere, and move as above. A hand-off that has not
 * happened within HANDOFF_TIMEOUT_MS is sent again.
 *
 * Moves and hand-offs are soft state: a restarted coordinator forgets them,
 * and the operator drains again. Everything runs with c->mu held. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "coordinator/coord_impl.h"

#define MOVE_TIMEOUT_MS 15000
#define HANDOFF_TIMEOUT_MS 10000
#define MOVES_IN_FLIGHT 256 /* per draining node */

static const char *node_id(kvm_coord *c, uint32_t ix)
{
	return ix < c->n_nodes ? c->nodes[ix].id : "?";
}

static void grpc_address(kvm_coord *c, uint32_t ix, char *buf, size_t cap)
{
	buf[0] = '\0';
	Kvmesh__V1__Node *reg = kvmesh__v1__node__unpack(NULL, c->nodes[ix].reg_len, c->nodes[ix].reg);
	if (reg) {
		snprintf(buf, cap, "%s", reg->grpc_address);
		kvmesh__v1__node__free_unpacked(reg, NULL);
	}
}

static blk_ent *move_blk(kvm_coord *c, const move_rec *m)
{
	return m->shared ? coord_blk_find(c, m->key) : NULL;
}

static soft_slot *move_slot(kvm_coord *c, const move_rec *m)
{
	soft_seq *s = m->shared ? NULL : coord_soft_find_data(c, m->data_id);
	return s && m->index < s->n ? &s->slots[m->index] : NULL;
}

/* Ends move i without completing it: the reservation on dst goes back. */
static void move_abandon(kvm_coord *c, size_t i)
{
	move_rec *m = &c->moves[i];
	if (m->home < c->n_nodes && m->dst < c->n_nodes)
		kvm_ledger_release(c->ledger, node_id(c, m->home), node_id(c, m->dst), 1);
	blk_ent *be = move_blk(c, m);
	soft_slot *sl = move_slot(c, m);
	if (be)
		be->moving = false;
	if (sl)
		sl->moving = false;
	c->moves[i] = c->moves[--c->n_moves];
}

static move_rec *move_add(kvm_coord *c)
{
	if (c->n_moves == c->cap_moves) {
		size_t cap = c->cap_moves ? c->cap_moves * 2 : 64;
		move_rec *p = realloc(c->moves, cap * sizeof(*p));
		if (!p)
			return NULL;
		c->moves = p;
		c->cap_moves = cap;
	}
	move_rec *m = &c->moves[c->n_moves++];
	memset(m, 0, sizeof(*m));
	return m;
}

/* Reserves a target for one block of a sequence homed at `home` and adds
 * the move to cmd. Returns 0, -ENOSPC (no room anywhere) or -ENOMEM. */
static int plan_one(kvm_coord *c, cmd_rec *cmd, uint32_t src, uint32_t home, const soft_seq *s,
		    uint32_t index, const Kvmesh__V1__BlockHandle *h, const kvs_key *key,
		    bool shared, bool release_src)
{
	kvm_ledger_grant g;
	size_t ng = 0;
	int rc = kvm_ledger_reserve(c->ledger, node_id(c, home), 1, &g, 1, &ng);
	if (rc)
		return rc == -ENOSPC ? -ENOSPC : -ENOMEM;
	uint32_t dst = coord_node_ix(c, g.id);
	move_rec *m = dst == NO_NODE || dst == src ? NULL : move_add(c);
	if (!m) {
		kvm_ledger_release(c->ledger, node_id(c, home), g.id, 1);
		return -ENOMEM;
	}
	*m = (move_rec){.data_id = s->data_id, .index = index, .shared = shared,
			.key = key ? *key : (kvs_key){0}, .src = src, .dst = dst, .home = home,
			.release_src = release_src, .deadline_ms = coord_mono_ms() + MOVE_TIMEOUT_MS};
	move_item *it = &cmd->moves[cmd->n++];
	memset(it, 0, sizeof(*it));
	kvmesh__v1__block_handle__init(&it->h);
	it->h.slot = h->slot;
	it->h.generation = h->generation;
	it->h.tier = h->tier;
	snprintf(it->sequence_id, sizeof(it->sequence_id), "%s", s->id);
	it->index = index;
	if (key) {
		it->keyed = true;
		kvs_key_to_bytes(*key, it->key);
	}
	snprintf(it->target, sizeof(it->target), "%s", g.id);
	grpc_address(c, dst, it->target_address, sizeof(it->target_address));
	return 0;
}

/* The node to take over a sequence homed on `from`: ready (so neither
 * cordoned nor draining), of the sequence's model, with the most free
 * blocks less the sequences already given to it in this step (given[], per
 * node). NO_NODE if none. */
static uint32_t pick_new_home(kvm_coord *c, uint32_t from, const char *model,
			      const uint32_t *given)
{
	uint32_t best = NO_NODE;
	int64_t best_free = 0;
	for (uint32_t i = 0; i < c->n_nodes; i++) {
		kvm_ledger_node ln;
		if (i == from || c->nodes[i].state != KVMESH__V1__NODE_STATE__NODE_READY ||
		    !kvm_ledger_models_match(c->nodes[i].model, model) ||
		    kvm_ledger_node_get(c->ledger, c->nodes[i].id, &ln) != 0)
			continue;
		uint64_t held = ln.used_blocks + ln.evictable_blocks;
		int64_t fr = (int64_t)(ln.total_blocks > held ? ln.total_blocks - held : 0) -
			     (given ? given[i] : 0);
		if (best == NO_NODE || fr > best_free) {
			best = i;
			best_free = fr;
		}
	}
	return best;
}

/* Sends a HandOff for each sequence homed on `node` that has none out,
 * spread over the ready nodes. */
static void plan_handoffs(kvm_coord *c, uint32_t node, uint64_t now)
{
	uint32_t *given = NULL, to = NO_NODE;
	for (size_t b = 0; b < c->seq_buckets; b++)
		for (soft_seq *s = c->seqs[b]; s; s = s->next) {
			/* A degraded sequence is not served: it stays, to be released. */
			if (s->home != node || s->handoff_until_ms > now || s->degraded)
				continue;
			if (!given && !(given = calloc(c->n_nodes, sizeof(*given))))
				return;
			if ((to = pick_new_home(c, node, s->model_id, given)) == NO_NODE) {
				if (!c->nodes[node].handoff_stalled_told)
					kvm_log(KVM_LOG_WARN, "drain_stalled",
						"node=%s error=\"no ready node of their model to take the "
						"sequences homed on it: they stay until released\"",
						c->nodes[node].id);
				c->nodes[node].handoff_stalled_told = true;
				free(given);
				return;
			}
			given[to]++;
			c->nodes[node].handoff_stalled_told = false;
			cmd_rec *cmd = calloc(1, sizeof(*cmd));
			if (!cmd || !(cmd->sequence_id = strdup(s->id))) {
				coord_cmd_free(cmd);
				free(given);
				return;
			}
			cmd->kind = KVMESH__V1__COMMAND__KIND_HAND_OFF;
			cmd->data_id = s->data_id;
			cmd->home_epoch = s->home_epoch;
			snprintf(cmd->target, sizeof(cmd->target), "%s", c->nodes[to].id);
			grpc_address(c, to, cmd->target_address, sizeof(cmd->target_address));
			coord_queue_cmd(c, node, cmd);
			s->handoff_until_ms = now + HANDOFF_TIMEOUT_MS;
			kvm_log(KVM_LOG_INFO, "drain_hand_off", "node=%s sequence=%s to=%s",
				c->nodes[node].id, s->id, c->nodes[to].id);
		}
	free(given);
}

void coord_drain_step(kvm_coord *c, uint32_t node)
{
	uint64_t now = coord_mono_ms();
	for (size_t i = 0; i < c->n_moves;) {
		if (c->moves[i].deadline_ms > now) {
			i++;
			continue;
		}
		kvm_log(KVM_LOG_WARN, "move_timed_out", "from=%s to=%s (planned again)",
			node_id(c, c->moves[i].src), node_id(c, c->moves[i].dst));
		move_abandon(c, i);
	}
	if (node >= c->n_nodes || c->nodes[node].state != KVMESH__V1__NODE_STATE__NODE_DRAINING)
		return;
	plan_handoffs(c, node, now);
	size_t budget = MOVES_IN_FLIGHT;
	for (size_t i = 0; i < c->n_moves && budget; i++)
		budget -= c->moves[i].src == node;
	if (!budget)
		return;
	if (budget == MOVES_IN_FLIGHT && !c->nodes[node].drained_told) {
		/* Nothing in flight: say once when nothing is left either. */
		uint64_t left;
		uint32_t homed;
		coord_drain_progress(c, node, &left, &homed);
		if (left == 0 && homed == 0) {
			c->nodes[node].drained_told = true;
			coord_node_event(c, node, "drained: nothing left on it; it can be stopped");
			return;
		}
	}
	cmd_rec *cmd = calloc(1, sizeof(*cmd));
	if (cmd)
		cmd->moves = calloc(budget, sizeof(*cmd->moves));
	if (!cmd || !cmd->moves) {
		coord_cmd_free(cmd);
		return;
	}
	cmd->kind = KVMESH__V1__COMMAND__KIND_MOVE;
	int rc = 0;
	for (size_t b = 0; b < c->seq_buckets && rc == 0 && cmd->n < budget; b++)
		for (soft_seq *s = c->seqs[b]; s && rc == 0 && cmd->n < budget; s = s->next) {
			if (s->home == node)
				continue;
			for (size_t i = 0; i < s->n && rc == 0 && cmd->n < budget; i++) {
				soft_slot *sl = &s->slots[i];
				blk_ent *be = sl->be;
				if (be && be->node == node && be->known && !be->moving) {
					bool charged = be->charged && be->charge_home < c->n_nodes;
					uint32_t home = charged ? be->charge_home : s->home;
					rc = plan_one(c, cmd, node, home, s, (uint32_t)i, &be->h, &be->key,
						      true, charged);
					be->moving = rc == 0;
				} else if (!be && sl->node == node && sl->known && !sl->moving) {
					rc = plan_one(c, cmd, node, s->home, s, (uint32_t)i, &sl->h,
						      sl->keyed ? &sl->key : NULL, false, true);
					sl->moving = rc == 0;
				}
			}
		}
	if (rc == -ENOSPC)
		kvm_log(KVM_LOG_WARN, "drain_stalled", "node=%s error=\"no room for its blocks elsewhere\"",
			c->nodes[node].id);
	if (cmd->n) {
		kvm_log(KVM_LOG_INFO, "drain_moves", "node=%s blocks=%zu", c->nodes[node].id, cmd->n);
		coord_queue_cmd(c, node, cmd);
	} else {
		coord_cmd_free(cmd);
	}
}

static void set_handle(Kvmesh__V1__BlockHandle *dst, const Kvmesh__V1__BlockHandle *src)
{
	dst->slot = src->slot;
	dst->generation = src->generation;
	dst->tier = src->tier;
}

/* A ReleaseBlocks of one handle for node `to`, staged on *staged. */
static void stage_release(cmd_rec **staged, uint32_t to, const Kvmesh__V1__BlockHandle *h)
{
	cmd_rec *r = calloc(1, sizeof(*r));
	if (r)
		r->handles = calloc(1, sizeof(*r->handles));
	if (!r || !r->handles) {
		coord_cmd_free(r); /* the old copy stays pinned until the node leaves */
		return;
	}
	r->kind = KVMESH__V1__COMMAND__KIND_RELEASE;
	r->to = to;
	r->n = 1;
	kvmesh__v1__block_handle__init(&r->handles[0]);
	set_handle(&r->handles[0], h);
	r->next = *staged;
	*staged = r;
}

/* Adds (s, index) to *moved; if it cannot grow, writes that record now. */
static void moved_add(kvm_coord *c, uint32_t node, moved_list *moved, soft_seq *s, uint32_t index,
		      uint64_t *ticket)
{
	if (moved->n == moved->cap) {
		size_t cap = moved->cap ? moved->cap * 2 : 64;
		struct moved_ent *p = realloc(moved->e, cap * sizeof(*p));
		if (!p) {
			coord_seq_set_nodes(c, s->id, &index, 1, c->nodes[node].id, ticket);
			return;
		}
		moved->e = p;
		moved->cap = cap;
	}
	moved->e[moved->n++] = (struct moved_ent){.s = s, .index = index};
}

static int cmp_moved(const void *a, const void *b)
{
	const struct moved_ent *x = a, *y = b;
	if (x->s != y->s)
		return (uintptr_t)x->s < (uintptr_t)y->s ? -1 : 1;
	return x->index < y->index ? -1 : x->index > y->index;
}

void coord_moved_flush(kvm_coord *c, uint32_t node, moved_list *moved, uint64_t *ticket)
{
	if (moved->n == 0) { /* most reports complete no move */
		free(moved->e);
		*moved = (moved_list){0};
		return;
	}
	qsort(moved->e, moved->n, sizeof(*moved->e), cmp_moved);
	uint32_t *idx = malloc((moved->n ? moved->n : 1) * sizeof(*idx));
	for (size_t i = 0, j; i < moved->n; i = j) {
		for (j = i + 1; j < moved->n && moved->e[j].s == moved->e[i].s; j++)
			;
		if (idx) {
			for (size_t k = i; k < j; k++)
				idx[k - i] = moved->e[k].index;
			coord_seq_set_nodes(c, moved->e[i].s->id, idx, j - i, c->nodes[node].id, ticket);
		} else {
			for (size_t k = i; k < j; k++)
				coord_seq_set_nodes(c, moved->e[k].s->id, &moved->e[k].index, 1,
						    c->nodes[node].id, ticket);
		}
	}
	free(idx);
	free(moved->e);
	*moved = (moved_list){0};
}

bool coord_move_done(kvm_coord *c, uint32_t node, soft_seq *s, uint32_t index,
		     const Kvmesh__V1__BlockReport *b, moved_list *moved, uint64_t *ticket,
		     cmd_rec **staged)
{
	soft_slot *sl = &s->slots[index];
	blk_ent *be = sl->be;
	size_t i = 0;
	for (; i < c->n_moves; i++) {
		const move_rec *m = &c->moves[i];
		if (m->dst == node && (be ? m->shared && kvs_key_eq(m->key, be->key)
					  : !m->shared && m->data_id == s->data_id && m->index == index))
			break;
	}
	if (i == c->n_moves)
		return false;
	move_rec m = c->moves[i];
	c->moves[i] = c->moves[--c->n_moves]; /* the reservation is the block's charge now */
	if (m.release_src)
		kvm_ledger_release(c->ledger, node_id(c, m.home), node_id(c, m.src), 1);
	uint32_t gen = c->nodes[node].report_gen;
	if (be) {
		if (be->known)
			stage_release(staged, m.src, &be->h);
		set_handle(&be->h, b->handle);
		be->node = node;
		be->known = true;
		be->mark = gen;
		be->moving = false;
		be->charged = true;
		be->charge_home = m.home;
		/* Every sequence sharing it names the node in its record. */
		for (size_t k = 0; k < c->seq_buckets; k++)
			for (soft_seq *q = c->seqs[k]; q; q = q->next)
				for (size_t j = 0; j < q->n; j++)
					if (q->slots[j].be == be) {
						q->slots[j].node = node;
						moved_add(c, node, moved, q, (uint32_t)j, ticket);
					}
	} else {
		if (sl->known)
			stage_release(staged, m.src, &sl->h);
		set_handle(&sl->h, b->handle);
		sl->node = node;
		sl->known = true;
		sl->mark = gen;
		sl->moving = false;
		moved_add(c, node, moved, s, index, ticket);
	}
	kvm_log(KVM_LOG_INFO, "block_moved", "sequence=%s index=%u from=%s to=%s", s->id, index,
		node_id(c, m.src), c->nodes[node].id);
	return true;
}

void coord_moves_seq_gone(kvm_coord *c, uint64_t data_id)
{
	for (size_t i = 0; i < c->n_moves;) {
		if (!c->moves[i].shared && c->moves[i].data_id == data_id)
			move_abandon(c, i);
		else
			i++;
	}
}

void coord_moves_node_lost(kvm_coord *c, uint32_t node)
{
	for (size_t i = 0; i < c->n_moves;) {
		if (c->moves[i].src == node || c->moves[i].dst == node)
			move_abandon(c, i);
		else
			i++;
	}
}

void coord_drain_progress(kvm_coord *c, uint32_t node, uint64_t *blocks_left, uint32_t *home_seqs)
{
	*blocks_left = 0;
	*home_seqs = 0;
	/* Until the node's full report after a (re)registration, which of its
	 * placements hold written blocks is unknown: count them all. */
	bool sure = c->nodes[node].reported;
	for (size_t b = 0; b < c->seq_buckets; b++)
		for (soft_seq *s = c->seqs[b]; s; s = s->next) {
			if (s->home == node) {
				*home_seqs += !s->degraded;
				continue;
			}
			for (size_t i = 0; i < s->n; i++) {
				const soft_slot *sl = &s->slots[i];
				/* Written blocks; a shared one counts once per sharer.
				 * A placement not written yet moves once written (or,
				 * with the node gone, its home keeps the block). */
				if (sl->be ? sl->be->node == node && (sl->be->known || !sure)
					   : sl->node == node && (sl->known || !sure))
					(*blocks_left)++;
			}
		}
}

void coord_moves_destroy(kvm_coord *c)
{
	free(c->moves);
	c->moves = NULL;
	c->n_moves = c->cap_moves = 0;
}
