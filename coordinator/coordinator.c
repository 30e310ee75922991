/* The coordinator service. See coordinator.h.
 *
 * Nodes are kept as their registration message (packed bytes, also the
 * durable record "nodes/ID") plus runtime fields that heartbeats change;
 * responses are built by unpacking the registration and overlaying them.
 * One mutex guards everything here; the ledger and store have their own. */
#include "coordinator/coordinator.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "coordinator/coord_impl.h"
#include "coordinator/links.h"

uint64_t coord_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

uint64_t coord_mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

const char *coord_state_name(Kvmesh__V1__NodeState s)
{
	switch (s) {
	case KVMESH__V1__NODE_STATE__NODE_READY:
		return "ready";
	case KVMESH__V1__NODE_STATE__NODE_CORDONED:
		return "cordoned";
	case KVMESH__V1__NODE_STATE__NODE_DRAINING:
		return "draining";
	case KVMESH__V1__NODE_STATE__NODE_DEAD:
		return "dead";
	default:
		return "unknown";
	}
}

/* Packs any message and sets it as the unary reply. */
int coord_reply(kvm_rpc_call *call, const ProtobufCMessage *m)
{
	size_t n = protobuf_c_message_get_packed_size(m);
	uint8_t *buf = malloc(n ? n : 1);
	if (!buf)
		return kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
	protobuf_c_message_pack(m, buf);
	kvm_rpc_reply(call, buf, n);
	free(buf);
	return KVM_RPC_OK;
}

node_rec *coord_find_node(kvm_coord *c, const char *id)
{
	for (size_t i = 0; i < c->n_nodes; i++)
		if (strcmp(c->nodes[i].id, id) == 0)
			return &c->nodes[i];
	return NULL;
}

void coord_emit(kvm_coord *c, Kvmesh__V1__Event *ev)
{
	ev->seq = ++c->next_seq;
	ev->unix_ms = coord_now_ms();
	event_rec *r = &c->ring[ev->seq % EVENT_RING];
	free(r->bytes);
	r->len = kvmesh__v1__event__get_packed_size(ev);
	r->bytes = malloc(r->len ? r->len : 1);
	if (r->bytes)
		kvmesh__v1__event__pack(ev, r->bytes);
	else
		r->len = 0;
	r->seq = ev->seq;
	pthread_cond_broadcast(&c->event_cv);
}

/* A node event; mu held. */
static void emit_node_event(kvm_coord *c, const char *id, Kvmesh__V1__NodeState state,
			    const char *reason)
{
	Kvmesh__V1__NodeEvent ne = KVMESH__V1__NODE_EVENT__INIT;
	ne.node_id = (char *)id;
	ne.state = state;
	ne.reason = (char *)reason;
	Kvmesh__V1__Event ev = KVMESH__V1__EVENT__INIT;
	ev.kind_case = KVMESH__V1__EVENT__KIND_NODE;
	ev.node = &ne;
	coord_emit(c, &ev);
	kvm_log(KVM_LOG_INFO, "node_state", "node=%s state=%s reason=\"%s\"", id, coord_state_name(state),
		reason);
}

void coord_node_event(kvm_coord *c, uint32_t node, const char *reason)
{
	emit_node_event(c, c->nodes[node].id, c->nodes[node].state, reason);
}

static void sum_capacity(const node_rec *n, uint64_t *total, uint64_t *evictable)
{
	*total = n->cap[0].total_blocks + n->cap[1].total_blocks;
	*evictable = n->cap[0].evictable_blocks + n->cap[1].evictable_blocks;
}

/* Tells the ledger what a node now has; call with mu held. */
static void sync_ledger(kvm_coord *c, const node_rec *n)
{
	uint64_t total, evictable;
	sum_capacity(n, &total, &evictable);
	kvm_ledger_node_set(c->ledger, n->id, total, evictable > total ? total : evictable,
			    n->state == KVMESH__V1__NODE_STATE__NODE_READY);
	kvm_ledger_node_model(c->ledger, n->id, n->model);
}

static void set_capacity(node_rec *n, size_t count, Kvmesh__V1__TierCapacity **caps)
{
	for (int t = 0; t < 2; t++) {
		kvmesh__v1__tier_capacity__init(&n->cap[t]);
		n->cap[t].tier = t == 0 ? KVMESH__V1__TIER__TIER_GPU : KVMESH__V1__TIER__TIER_HOST;
	}
	for (size_t i = 0; i < count; i++) {
		int t = caps[i]->tier == KVMESH__V1__TIER__TIER_GPU ? 0 : 1;
		Kvmesh__V1__TierCapacity *dst = &n->cap[t];
		dst->total_blocks = caps[i]->total_blocks;
		dst->free_blocks = caps[i]->free_blocks;
		dst->used_blocks = caps[i]->used_blocks;
		dst->evictable_blocks = caps[i]->evictable_blocks;
	}
}

/* Adds or replaces a node record from its packed registration; mu held. */
static node_rec *upsert_node(kvm_coord *c, const Kvmesh__V1__Node *reg)
{
	node_rec *n = coord_find_node(c, reg->id);
	if (!n) {
		if (c->n_nodes == c->cap_nodes) {
			size_t cap = c->cap_nodes ? c->cap_nodes * 2 : 8;
			node_rec *p = realloc(c->nodes, cap * sizeof(*p));
			if (!p)
				return NULL;
			c->nodes = p;
			c->cap_nodes = cap;
		}
		n = &c->nodes[c->n_nodes++];
		memset(n, 0, sizeof(*n));
		snprintf(n->id, sizeof(n->id), "%s", reg->id);
	}
	free(n->reg);
	n->reg_len = kvmesh__v1__node__get_packed_size(reg);
	n->reg = malloc(n->reg_len ? n->reg_len : 1);
	if (!n->reg)
		return NULL;
	kvmesh__v1__node__pack(reg, n->reg);
	n->incarnation = reg->incarnation;
	set_capacity(n, reg->n_capacity, reg->capacity);
	snprintf(n->model, sizeof(n->model), "%s", reg->model_id);
	return n;
}

/* Tells the ledger the bandwidth between `reg` and every other node, from
 * their NICs; mu held. */
static void update_links(kvm_coord *c, const Kvmesh__V1__Node *reg)
{
	for (size_t i = 0; i < c->n_nodes; i++) {
		node_rec *o = &c->nodes[i];
		if (strcmp(o->id, reg->id) == 0)
			continue;
		Kvmesh__V1__Node *other = kvmesh__v1__node__unpack(NULL, o->reg_len, o->reg);
		if (!other)
			continue;
		double gbps = kvm_link_gbps(reg, other);
		kvm_ledger_link_set(c->ledger, reg->id, o->id, gbps);
		kvm_log(KVM_LOG_DEBUG, "link", "a=%s b=%s gbps=%.1f", reg->id, o->id, gbps);
		kvmesh__v1__node__free_unpacked(other, NULL);
	}
}

/* ---- Handlers ----------------------------------------------------------------- */

#define UNPACK_OR_FAIL(type, fn, var)                                                              \
	type *var = fn##__unpack(NULL, len, req);                                                  \
	if (!var)                                                                                  \
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed " #type);

bool coord_valid_id(const char *s)
{
	size_t n = strlen(s);
	if (n == 0 || n >= KVM_NODE_ID_MAX)
		return false;
	for (const char *p = s; *p; p++)
		if (!(*p == '-' || *p == '_' || *p == '.' || (*p >= '0' && *p <= '9') ||
		      (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')))
			return false;
	return true;
}

static int register_node(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	UNPACK_OR_FAIL(Kvmesh__V1__RegisterNodeRequest, kvmesh__v1__register_node_request, r);
	int rc = KVM_RPC_OK;
	if (!r->node || !coord_valid_id(r->node->id)) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				  "node.id must be 1-%d characters of [A-Za-z0-9._-]",
				  KVM_NODE_ID_MAX - 1);
		goto out;
	}
	if (!r->node->grpc_address[0] || !r->node->data_address[0]) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				  "node %s: grpc_address and data_address are required", r->node->id);
		goto out;
	}
	if (r->node->model_id[0] && !coord_valid_id(r->node->model_id)) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				  "node %s: model_id must be 1-%d characters of [A-Za-z0-9._-]",
				  r->node->id, KVM_MODEL_ID_MAX - 1);
		goto out;
	}
	/* Durable first: a node the coordinator acknowledged survives a restart. */
	char key[128];
	snprintf(key, sizeof(key), "nodes/%s", r->node->id);
	size_t n = kvmesh__v1__node__get_packed_size(r->node);
	uint8_t *buf = malloc(n ? n : 1);
	if (!buf) {
		rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	kvmesh__v1__node__pack(r->node, buf);
	int src = kvm_state_upkeep(c->st, key, buf, n);
	free(buf);
	if (src != 0) {
		rc = coord_store_fail(c, call, src);
		goto out;
	}
	pthread_mutex_lock(&c->mu);
	/* Another incarnation of a live node: its agent restarted (faster than
	 * --dead-after), and what it held in memory is gone. */
	node_rec *was = coord_find_node(c, r->node->id);
	bool restarted = was && was->state != KVMESH__V1__NODE_STATE__NODE_DEAD && was->incarnation &&
			 r->node->incarnation && was->incarnation != r->node->incarnation;
	node_rec *nd = upsert_node(c, r->node);
	uint64_t epoch = 0;
	if (nd && restarted) {
		nd->restarts++;
		kvm_log(KVM_LOG_WARN, "node_restarted", "node=%s msg=\"its blocks and tails are gone\"",
			nd->id);
		coord_soft_node_lost(c, (uint32_t)(nd - c->nodes));
		coord_node_lost(c, nd->id, "restarted");
	}
	if (nd) {
		/* Epochs only grow: a heartbeat from before this registration is stale. */
		uint64_t t = coord_now_ms();
		nd->epoch = t > nd->epoch ? t : nd->epoch + 1;
		epoch = nd->epoch;
		/* Cordon and drain outlive re-registrations (UncordonNode ends them). */
		nd->state = nd->admin ? nd->admin : KVMESH__V1__NODE_STATE__NODE_READY;
		nd->last_heartbeat_ms = coord_now_ms();
		nd->heard_ms = coord_mono_ms();
		nd->drain_pending = nd->state == KVMESH__V1__NODE_STATE__NODE_DRAINING;
		nd->drained_told = false;
		nd->full_open = false; /* a full report cut short by a restart is void */
		nd->reported = false;
		sync_ledger(c, nd);
		update_links(c, r->node);
		emit_node_event(c, nd->id, nd->state, "registered");
	}
	pthread_mutex_unlock(&c->mu);
	if (!nd) {
		rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	Kvmesh__V1__RegisterNodeResponse resp = KVMESH__V1__REGISTER_NODE_RESPONSE__INIT;
	resp.node_id = r->node->id;
	resp.epoch = epoch;
	resp.heartbeat_ms = (uint32_t)c->cfg.heartbeat_ms;
	rc = coord_reply(call, &resp.base);
out:
	kvmesh__v1__register_node_request__free_unpacked(r, NULL);
	return rc;
}

/* Builds the heartbeat response from a detached command list (a Drain
 * first, when one is pending), outside mu. */
static int reply_commands(kvm_rpc_call *call, bool drain, const cmd_rec *list, size_t n)
{
	size_t total = n + (drain ? 1 : 0);
	Kvmesh__V1__Command *cmds = calloc(total + 1, sizeof(*cmds));
	Kvmesh__V1__Command **ptrs = calloc(total + 1, sizeof(*ptrs));
	Kvmesh__V1__Command__ReleaseBlocks *rel = calloc(n + 1, sizeof(*rel));
	Kvmesh__V1__Command__ReleaseSequence *rs = calloc(n + 1, sizeof(*rs));
	Kvmesh__V1__BlockHandle ***hp = calloc(n + 1, sizeof(*hp));
	Kvmesh__V1__Command__MoveBlocks *mv = calloc(n + 1, sizeof(*mv));
	Kvmesh__V1__Command__MoveBlocks__Move **mp = calloc(n + 1, sizeof(*mp));
	Kvmesh__V1__Command__MoveBlocks__Move ***mpp = calloc(n + 1, sizeof(*mpp));
	Kvmesh__V1__Command__HandOff *ho = calloc(n + 1, sizeof(*ho));
	Kvmesh__V1__Command__Drain d = KVMESH__V1__COMMAND__DRAIN__INIT;
	int rc;
	size_t k = 0, i = 0;
	if (!cmds || !ptrs || !rel || !rs || !hp || !mv || !mp || !mpp || !ho) {
		rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	if (drain) {
		kvmesh__v1__command__init(&cmds[k]);
		d.reason = "drain requested";
		cmds[k].kind_case = KVMESH__V1__COMMAND__KIND_DRAIN;
		cmds[k].drain = &d;
		ptrs[k] = &cmds[k];
		k++;
	}
	for (const cmd_rec *m = list; m; m = m->next, i++) {
		kvmesh__v1__command__init(&cmds[k]);
		if (m->kind == KVMESH__V1__COMMAND__KIND_RELEASE) {
			kvmesh__v1__command__release_blocks__init(&rel[i]);
			hp[i] = calloc(m->n + 1, sizeof(**hp));
			if (!hp[i])
				continue;
			for (size_t j = 0; j < m->n; j++)
				hp[i][j] = &m->handles[j];
			rel[i].n_handles = m->n;
			rel[i].handles = hp[i];
			cmds[k].kind_case = KVMESH__V1__COMMAND__KIND_RELEASE;
			cmds[k].release = &rel[i];
		} else if (m->kind == KVMESH__V1__COMMAND__KIND_MOVE) {
			kvmesh__v1__command__move_blocks__init(&mv[i]);
			mp[i] = calloc(m->n + 1, sizeof(**mp));
			mpp[i] = calloc(m->n + 1, sizeof(**mpp));
			if (!mp[i] || !mpp[i])
				continue;
			for (size_t j = 0; j < m->n; j++) {
				move_item *it = &m->moves[j];
				Kvmesh__V1__Command__MoveBlocks__Move *o = &mp[i][j];
				kvmesh__v1__command__move_blocks__move__init(o);
				o->handle = &it->h;
				o->sequence_id = it->sequence_id;
				o->index = it->index;
				if (it->keyed) {
					o->key.data = it->key;
					o->key.len = 16;
				}
				o->target_node = it->target;
				o->target_address = it->target_address;
				mpp[i][j] = o;
			}
			mv[i].n_moves = m->n;
			mv[i].moves = mpp[i];
			cmds[k].kind_case = KVMESH__V1__COMMAND__KIND_MOVE;
			cmds[k].move = &mv[i];
		} else if (m->kind == KVMESH__V1__COMMAND__KIND_HAND_OFF) {
			kvmesh__v1__command__hand_off__init(&ho[i]);
			ho[i].sequence_id = m->sequence_id;
			ho[i].data_id = m->data_id;
			ho[i].target_node = (char *)m->target;
			ho[i].target_address = (char *)m->target_address;
			ho[i].home_epoch = m->home_epoch;
			cmds[k].kind_case = KVMESH__V1__COMMAND__KIND_HAND_OFF;
			cmds[k].hand_off = &ho[i];
		} else {
			kvmesh__v1__command__release_sequence__init(&rs[i]);
			rs[i].sequence_id = m->sequence_id;
			rs[i].data_id = m->data_id;
			cmds[k].kind_case = KVMESH__V1__COMMAND__KIND_RELEASE_SEQUENCE;
			cmds[k].release_sequence = &rs[i];
		}
		ptrs[k] = &cmds[k];
		k++;
	}
	Kvmesh__V1__HeartbeatResponse resp = KVMESH__V1__HEARTBEAT_RESPONSE__INIT;
	resp.n_commands = k;
	resp.commands = ptrs;
	rc = coord_reply(call, &resp.base);
out:
	for (size_t j = 0; j < n; j++) {
		if (hp)
			free(hp[j]);
		if (mp)
			free(mp[j]);
		if (mpp)
			free(mpp[j]);
	}
	free(hp);
	free(ho);
	free(mv);
	free(mp);
	free(mpp);
	free(rs);
	free(rel);
	free(ptrs);
	free(cmds);
	return rc;
}

static int heartbeat(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	UNPACK_OR_FAIL(Kvmesh__V1__HeartbeatRequest, kvmesh__v1__heartbeat_request, r);
	int rc = KVM_RPC_OK;
	bool drain = false;
	cmd_rec *list = NULL;
	size_t n_list = 0;
	pthread_mutex_lock(&c->mu);
	node_rec *nd = coord_find_node(c, r->node_id);
	if (!nd) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown node \"%s\": register first",
				  r->node_id);
	} else if (r->epoch != nd->epoch) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION,
				  "node %s: epoch %llu is not the current %llu: register again",
				  r->node_id, (unsigned long long)r->epoch,
				  (unsigned long long)nd->epoch);
	} else if (nd->state == KVMESH__V1__NODE_STATE__NODE_DEAD) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION,
				  "node %s was declared dead: register again", r->node_id);
	} else {
		nd->last_heartbeat_ms = coord_now_ms();
		nd->heard_ms = coord_mono_ms();
		nd->load = isfinite(r->load) ? r->load : 0;
		if (r->n_capacity > 0) /* none: unchanged since the last report */
			set_capacity(nd, r->n_capacity, r->capacity);
		sync_ledger(c, nd);
		drain = nd->drain_pending;
		nd->drain_pending = false;
		coord_drain_step(c, (uint32_t)(nd - c->nodes));
		/* Every pending command, in the order issued. */
		list = nd->cmd_head;
		n_list = nd->n_cmds;
		nd->cmd_head = nd->cmd_tail = NULL;
		nd->n_cmds = 0;
	}
	pthread_mutex_unlock(&c->mu);
	if (rc == KVM_RPC_OK)
		rc = reply_commands(call, drain, list, n_list);
	while (list) {
		cmd_rec *nx = list->next;
		coord_cmd_free(list);
		list = nx;
	}
	kvmesh__v1__heartbeat_request__free_unpacked(r, NULL);
	return rc;
}

/* The node as clients see it: registration plus runtime fields. The result
 * is from protobuf-c's unpack: free with kvmesh__v1__node__free_unpacked
 * after restore_node. */
static Kvmesh__V1__Node *node_view(kvm_coord *c, node_rec *nd, Kvmesh__V1__TierCapacity **caps,
				   size_t *saved_n, Kvmesh__V1__TierCapacity ***saved)
{
	Kvmesh__V1__Node *v = kvmesh__v1__node__unpack(NULL, nd->reg_len, nd->reg);
	if (!v)
		return NULL;
	v->state = nd->state;
	v->load = nd->load;
	v->last_heartbeat_unix_ms = nd->last_heartbeat_ms;
	kvm_ledger_node ln;
	if (kvm_ledger_node_get(c->ledger, nd->id, &ln) == 0) {
		v->lent_blocks = ln.lent_blocks;
		v->borrowed_blocks = ln.borrowed_blocks;
		v->lend_cap_blocks = ln.lend_cap_blocks;
	}
	if (nd->state == KVMESH__V1__NODE_STATE__NODE_DRAINING)
		coord_drain_progress(c, (uint32_t)(nd - c->nodes), &v->drain_blocks_left,
				     &v->drain_home_sequences);
	/* Swap in the live capacity; the unpacked array is put back before free. */
	*saved_n = v->n_capacity;
	*saved = v->capacity;
	caps[0] = &nd->cap[0];
	caps[1] = &nd->cap[1];
	v->n_capacity = 2;
	v->capacity = caps;
	return v;
}

static void free_view(Kvmesh__V1__Node *v, size_t saved_n, Kvmesh__V1__TierCapacity **saved)
{
	v->n_capacity = saved_n;
	v->capacity = saved;
	kvmesh__v1__node__free_unpacked(v, NULL);
}

static int list_nodes(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	(void)req;
	(void)len;
	pthread_mutex_lock(&c->mu);
	size_t n = c->n_nodes;
	Kvmesh__V1__Node **views = calloc(n + 1, sizeof(*views));
	Kvmesh__V1__TierCapacity **caps = calloc(2 * n + 1, sizeof(*caps)), ***saved = calloc(n + 1, sizeof(*saved));
	size_t *saved_n = calloc(n + 1, sizeof(size_t));
	int rc = KVM_RPC_OK;
	if (!views || !caps || !saved || !saved_n) {
		rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
		n = 0;
	}
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		Kvmesh__V1__Node *v = node_view(c, &c->nodes[i], caps + 2 * k, &saved_n[k], &saved[k]);
		if (v)
			views[k++] = v;
	}
	if (rc == KVM_RPC_OK) {
		Kvmesh__V1__ListNodesResponse resp = KVMESH__V1__LIST_NODES_RESPONSE__INIT;
		resp.n_nodes = k;
		resp.nodes = views;
		rc = coord_reply(call, &resp.base);
	}
	pthread_mutex_unlock(&c->mu);
	for (size_t i = 0; i < k; i++)
		free_view(views[i], saved_n[i], saved[i]);
	free(views);
	free(caps);
	free(saved);
	free(saved_n);
	return rc;
}

/* The operator's state of a node, kept under "admin/ID" (READY: none). */
static int store_admin(kvm_coord *c, const char *id, Kvmesh__V1__NodeState state)
{
	char key[128];
	snprintf(key, sizeof(key), "admin/%s", id);
	if (state == KVMESH__V1__NODE_STATE__NODE_READY) {
		int rc = kvm_state_del(c->st, key);
		return rc == -ENOENT ? 0 : rc;
	}
	const char *v = state == KVMESH__V1__NODE_STATE__NODE_DRAINING ? "draining" : "cordoned";
	return kvm_state_upkeep(c->st, key, v, strlen(v));
}

/* CordonNode and DrainNode: no new blocks or homes on the node; drain also
 * tells the agent, on its next heartbeat, to drop its cache, and moves the
 * blocks that sequences homed elsewhere keep there to other nodes
 * (drain.c). UncordonNode (state READY) undoes both. Durable first. */
static int set_node_state(kvm_coord *c, kvm_rpc_call *call, const uint8_t *req, size_t len,
			  Kvmesh__V1__NodeState state)
{
	UNPACK_OR_FAIL(Kvmesh__V1__NodeRequest, kvmesh__v1__node_request, r);
	int rc;
	pthread_mutex_lock(&c->mu);
	node_rec *nd = coord_find_node(c, r->node_id);
	/* Cordoning a draining node leaves it draining. */
	Kvmesh__V1__NodeState want = nd && state == KVMESH__V1__NODE_STATE__NODE_CORDONED &&
					     nd->admin == KVMESH__V1__NODE_STATE__NODE_DRAINING
					     ? nd->admin
					     : state;
	int src;
	if (!nd) {
		rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown node \"%s\"", r->node_id);
	} else if (nd->state == KVMESH__V1__NODE_STATE__NODE_DEAD &&
		   state != KVMESH__V1__NODE_STATE__NODE_READY) {
		rc = kvm_rpc_fail(call, KVM_RPC_FAILED_PRECONDITION, "node %s is dead", r->node_id);
	} else if (want != (nd->admin ? nd->admin : KVMESH__V1__NODE_STATE__NODE_READY) &&
		   (src = store_admin(c, nd->id, want)) != 0) {
		rc = coord_store_fail(c, call, src);
	} else {
		nd->admin = want == KVMESH__V1__NODE_STATE__NODE_READY ? 0 : want;
		if (nd->state != want && nd->state != KVMESH__V1__NODE_STATE__NODE_DEAD) {
			nd->state = want;
			nd->drain_pending = want == KVMESH__V1__NODE_STATE__NODE_DRAINING;
			nd->drained_told = false;
			sync_ledger(c, nd);
			emit_node_event(c, nd->id, nd->state,
					want == KVMESH__V1__NODE_STATE__NODE_DRAINING ? "drain requested"
					: want == KVMESH__V1__NODE_STATE__NODE_CORDONED ? "cordoned"
											: "uncordoned");
			coord_drain_step(c, (uint32_t)(nd - c->nodes));
		}
		Kvmesh__V1__TierCapacity *caps[2], **saved;
		size_t saved_n;
		Kvmesh__V1__Node *v = node_view(c, nd, caps, &saved_n, &saved);
		rc = v ? coord_reply(call, &v->base)
		       : kvm_rpc_fail(call, KVM_RPC_INTERNAL, "node record unreadable");
		if (v)
			free_view(v, saved_n, saved);
	}
	pthread_mutex_unlock(&c->mu);
	kvmesh__v1__node_request__free_unpacked(r, NULL);
	return rc;
}

static int cordon_node(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	return set_node_state(arg, call, req, len, KVMESH__V1__NODE_STATE__NODE_CORDONED);
}

static int drain_node(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	return set_node_state(arg, call, req, len, KVMESH__V1__NODE_STATE__NODE_DRAINING);
}

static int uncordon_node(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	return set_node_state(arg, call, req, len, KVMESH__V1__NODE_STATE__NODE_READY);
}

static const char *check_model(const Kvmesh__V1__Model *m)
{
	const Kvmesh__V1__BlockGeometry *g = m->geometry;
	if (!coord_valid_id(m->id))
		return "id must be 1-63 characters of [A-Za-z0-9._-]";
	if (!g)
		return "geometry is required";
	if (g->layers == 0 || g->layers > 1024)
		return "geometry.layers must be 1..1024";
	if (g->kv_heads == 0 || g->kv_heads > 256)
		return "geometry.kv_heads must be 1..256";
	if (g->head_dim == 0 || g->head_dim > 512)
		return "geometry.head_dim must be 1..512";
	if (g->block_tokens == 0 || g->block_tokens > 4096)
		return "geometry.block_tokens must be 1..4096";
	if (g->dtype == KVMESH__V1__KV_DTYPE__KV_DTYPE_UNSPECIFIED || g->dtype > 3)
		return "geometry.dtype must be F32, F16 or BF16";
	if (m->q_heads == 0 || m->q_heads % g->kv_heads != 0)
		return "q_heads must be a positive multiple of geometry.kv_heads";
	return NULL;
}

static int register_model(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	UNPACK_OR_FAIL(Kvmesh__V1__Model, kvmesh__v1__model, m);
	int rc;
	const char *why = check_model(m);
	char key[128];
	snprintf(key, sizeof(key), "models/%s", m->id);
	void *old;
	size_t old_len;
	size_t n = kvmesh__v1__model__get_packed_size(m);
	uint8_t *buf = malloc(n ? n : 1);
	if (why) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "model %s: %s", m->id, why);
	} else if (!buf) {
		rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
	} else {
		kvmesh__v1__model__pack(m, buf);
		pthread_mutex_lock(&c->mu); /* check-then-put as one step */
		if (kvm_state_get(c->st, key, &old, &old_len) == 0) {
			bool same = old_len == n && memcmp(old, buf, n) == 0;
			free(old);
			rc = same ? coord_reply(call, &m->base)
				  : kvm_rpc_fail(call, KVM_RPC_ALREADY_EXISTS,
						 "model %s exists with another geometry", m->id);
		} else {
			int src = kvm_state_put(c->st, key, buf, n);
			rc = src == 0 ? coord_reply(call, &m->base)
				      : coord_store_fail(c, call, src);
		}
		pthread_mutex_unlock(&c->mu);
	}
	free(buf);
	kvmesh__v1__model__free_unpacked(m, NULL);
	return rc;
}

typedef struct model_list {
	Kvmesh__V1__Model **items;
	size_t n, cap;
} model_list;

static int collect_model(void *arg, const char *key, const void *val, size_t len)
{
	(void)key;
	model_list *l = arg;
	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 16;
		Kvmesh__V1__Model **p = realloc(l->items, cap * sizeof(*p));
		if (!p)
			return -ENOMEM;
		l->items = p;
		l->cap = cap;
	}
	Kvmesh__V1__Model *m = kvmesh__v1__model__unpack(NULL, len, val);
	if (m)
		l->items[l->n++] = m;
	return 0;
}

static int list_models(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	(void)req;
	(void)len;
	model_list l = {0};
	int rc = kvm_state_scan(c->st, "models/", collect_model, &l);
	if (rc == 0) {
		Kvmesh__V1__ListModelsResponse resp = KVMESH__V1__LIST_MODELS_RESPONSE__INIT;
		resp.n_models = l.n;
		resp.models = l.items;
		rc = coord_reply(call, &resp.base);
	} else {
		rc = kvm_rpc_fail(call, KVM_RPC_INTERNAL, "state store: %s", strerror(-rc));
	}
	for (size_t i = 0; i < l.n; i++)
		kvmesh__v1__model__free_unpacked(l.items[i], NULL);
	free(l.items);
	return rc;
}

/* Streams every event from now on until the client leaves or the server stops. */
static int watch_events(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_coord *c = arg;
	UNPACK_OR_FAIL(Kvmesh__V1__WatchEventsRequest, kvmesh__v1__watch_events_request, r);
	uint64_t after = r->after_seq;
	kvmesh__v1__watch_events_request__free_unpacked(r, NULL);
	pthread_mutex_lock(&c->mu);
	uint64_t next = c->next_seq + 1;
	if (after > 0 && after < c->next_seq)
		next = after + 1; /* clamped below to what the ring still holds */
	for (;;) {
		while (c->next_seq < next && !c->stopping) {
			struct timespec until;
			clock_gettime(CLOCK_REALTIME, &until);
			until.tv_nsec += 200 * 1000 * 1000;
			if (until.tv_nsec >= 1000000000L)
				until.tv_sec++, until.tv_nsec -= 1000000000L;
			pthread_cond_timedwait(&c->event_cv, &c->mu, &until);
			if (c->next_seq < next) {
				pthread_mutex_unlock(&c->mu);
				bool gone = kvm_rpc_cancelled(call);
				pthread_mutex_lock(&c->mu);
				if (gone)
					goto out;
			}
		}
		if (c->stopping)
			break;
		if (c->next_seq - next >= EVENT_RING) /* a slow watcher skips what the ring lost */
			next = c->next_seq - EVENT_RING + 1;
		event_rec *r = &c->ring[next % EVENT_RING];
		uint8_t *copy = malloc(r->len ? r->len : 1);
		size_t n = r->len;
		if (copy)
			memcpy(copy, r->bytes, n);
		next++;
		pthread_mutex_unlock(&c->mu);
		int src = copy ? kvm_rpc_send(call, copy, n) : -ENOMEM;
		free(copy);
		pthread_mutex_lock(&c->mu);
		if (src != 0)
			break;
	}
out:
	pthread_mutex_unlock(&c->mu);
	return KVM_RPC_OK;
}

/* ---- Liveness --------------------------------------------------------------------- */

/* The coordinator itself was stopped or starved (SIGSTOP, a paused VM, a
 * CPU quota) for `gap` ms: heartbeats could not be heard meanwhile, so the
 * time does not count against the nodes; mu held. */
static void forgive_stall(kvm_coord *c, uint64_t gap, uint64_t now)
{
	/* Never past now: a heartbeat handled since the stall heard it now. */
	for (size_t i = 0; i < c->n_nodes; i++) {
		node_rec *nd = &c->nodes[i];
		if (nd->state != KVMESH__V1__NODE_STATE__NODE_DEAD)
			nd->heard_ms = nd->heard_ms + gap < now ? nd->heard_ms + gap : now;
	}
	c->stalls++;
	kvm_log(KVM_LOG_WARN, "coordinator_stalled", "ms=%llu msg=\"heartbeat ages do not count the stall\"",
		(unsigned long long)gap);
}

static void *liveness_main(void *arg)
{
	kvm_coord *c = arg;
	pthread_mutex_lock(&c->mu);
	uint64_t last = coord_mono_ms();
	while (!c->stopping) {
		struct timespec until;
		clock_gettime(CLOCK_REALTIME, &until);
		int64_t step = c->cfg.heartbeat_ms / 2 > 10 ? c->cfg.heartbeat_ms / 2 : 10;
		until.tv_sec += step / 1000;
		until.tv_nsec += (step % 1000) * 1000000L;
		if (until.tv_nsec >= 1000000000L)
			until.tv_sec++, until.tv_nsec -= 1000000000L;
		pthread_cond_timedwait(&c->stop_cv, &c->mu, &until);
		uint64_t t = coord_mono_ms();
		/* Woken a heartbeat or more late: this process was not running. */
		if (t - last > (uint64_t)(step + c->cfg.heartbeat_ms))
			forgive_stall(c, t - last - (uint64_t)step, t);
		last = t;
		for (size_t i = 0; i < c->n_nodes; i++) {
			node_rec *nd = &c->nodes[i];
			/* A drain that just ended says so even if the node stops
			 * heartbeating at once (an agent draining before exit). */
			if (nd->state == KVMESH__V1__NODE_STATE__NODE_DRAINING && !nd->drained_told)
				coord_drain_step(c, (uint32_t)i);
			if (nd->state == KVMESH__V1__NODE_STATE__NODE_DEAD ||
			    t < nd->heard_ms || t - nd->heard_ms < (uint64_t)c->cfg.dead_after_ms)
				continue;
			nd->state = KVMESH__V1__NODE_STATE__NODE_DEAD;
			sync_ledger(c, nd);
			char why[96];
			snprintf(why, sizeof(why), "no heartbeat for %llu ms",
				 (unsigned long long)(t - nd->heard_ms));
			emit_node_event(c, nd->id, nd->state, why);
			coord_soft_node_lost(c, (uint32_t)i);
			coord_node_lost(c, nd->id, "died");
		}
	}
	pthread_mutex_unlock(&c->mu);
	return NULL;
}

/* ---- Set-up ------------------------------------------------------------------------ */

static int recover_node(void *arg, const char *key, const void *val, size_t len)
{
	(void)key;
	kvm_coord *c = arg;
	Kvmesh__V1__Node *reg = kvmesh__v1__node__unpack(NULL, len, val);
	if (!reg)
		return 0; /* an unreadable record is skipped, not fatal */
	node_rec *nd = upsert_node(c, reg);
	if (nd) {
		/* Alive until proven otherwise: a grace period of one dead_after. */
		nd->state = KVMESH__V1__NODE_STATE__NODE_READY;
		nd->last_heartbeat_ms = coord_now_ms();
		nd->heard_ms = coord_mono_ms();
		nd->epoch = 0; /* its agent must register again */
		sync_ledger(c, nd);
		update_links(c, reg);
	}
	kvmesh__v1__node__free_unpacked(reg, NULL);
	return 0;
}

/* A cordon or drain set before the restart (after recover_node). */
static int recover_admin(void *arg, const char *key, const void *val, size_t len)
{
	kvm_coord *c = arg;
	node_rec *nd = coord_find_node(c, key + strlen("admin/"));
	if (!nd)
		return 0;
	bool draining = len == strlen("draining") && memcmp(val, "draining", len) == 0;
	nd->admin = draining ? KVMESH__V1__NODE_STATE__NODE_DRAINING : KVMESH__V1__NODE_STATE__NODE_CORDONED;
	nd->state = nd->admin;
	nd->drain_pending = draining;
	sync_ledger(c, nd);
	return 0;
}

int kvm_coord_create(const kvm_coord_config *cfg, kvm_state *st, kvm_rpc_server *srv,
		     kvm_coord **out)
{
	if (!cfg || !st || !srv || !out || cfg->heartbeat_ms <= 0 ||
	    cfg->dead_after_ms <= cfg->heartbeat_ms)
		return -EINVAL;
	kvm_coord *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->cfg = *cfg;
	c->st = st;
	pthread_mutex_init(&c->mu, NULL);
	pthread_cond_init(&c->event_cv, NULL);
	pthread_cond_init(&c->stop_cv, NULL);
	int rc = kvm_ledger_create(cfg->lend_share, &c->ledger);
	if (rc != 0)
		goto fail;
	rc = kvm_state_scan(st, "nodes/", recover_node, c);
	if (rc == 0)
		rc = kvm_state_scan(st, "admin/", recover_admin, c);
	if (rc == 0)
		rc = coord_recover_sequences(c); /* the ledger's reservations */
	if (rc != 0)
		goto fail;

	static const struct {
		const char *name;
		unsigned flags; /* inline: never waits for the disk */
		kvm_rpc_handler fn;
	} methods[] = {
		{"RegisterNode", KVM_RPC_UNARY, register_node},
		{"Heartbeat", KVM_RPC_INLINE, heartbeat},
		{"ReportBlocks", KVM_RPC_UNARY, coord_report_blocks},
		{"RegisterModel", KVM_RPC_UNARY, register_model},
		{"ListModels", KVM_RPC_INLINE, list_models},
		{"CreateSequence", KVM_RPC_INLINE, coord_create_sequence},
		{"ExtendSequence", KVM_RPC_INLINE, coord_extend_sequence},
		{"GetSequence", KVM_RPC_INLINE, coord_get_sequence},
		{"ListSequences", KVM_RPC_INLINE, coord_list_sequences},
		{"MatchPrefix", KVM_RPC_INLINE, coord_match_prefix},
		{"ReleaseSequence", KVM_RPC_INLINE, coord_release_sequence},
		{"MoveSequenceHome", KVM_RPC_INLINE, coord_move_sequence_home},
		{"ListNodes", KVM_RPC_INLINE, list_nodes},
		{"CordonNode", KVM_RPC_UNARY, cordon_node},
		{"DrainNode", KVM_RPC_UNARY, drain_node},
		{"UncordonNode", KVM_RPC_UNARY, uncordon_node},
		{"WatchEvents", KVM_RPC_STREAMING, watch_events},
	};
	for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++) {
		char path[128];
		snprintf(path, sizeof(path), "/kvmesh.v1.Coordinator/%s", methods[i].name);
		rc = kvm_rpc_server_add_method(srv, path, methods[i].flags, methods[i].fn, c);
		if (rc != 0)
			goto fail;
	}
	if ((rc = coord_commit_start(c)) != 0)
		goto fail;
	if (pthread_create(&c->liveness, NULL, liveness_main, c) != 0) {
		rc = -EAGAIN;
		goto fail;
	}
	*out = c;
	return 0;
fail:
	coord_commit_stop(c);
	coord_soft_destroy(c);
	kvm_ledger_destroy(c->ledger);
	for (size_t i = 0; i < c->n_nodes; i++)
		free(c->nodes[i].reg);
	free(c->nodes);
	free(c);
	return rc;
}

void kvm_coord_destroy(kvm_coord *c)
{
	if (!c)
		return;
	pthread_mutex_lock(&c->mu);
	c->stopping = true;
	pthread_cond_broadcast(&c->stop_cv);
	pthread_cond_broadcast(&c->event_cv);
	pthread_mutex_unlock(&c->mu);
	pthread_join(c->liveness, NULL);
	coord_commit_stop(c);
	coord_soft_destroy(c);
	for (size_t i = 0; i < c->n_nodes; i++)
		free(c->nodes[i].reg);
	for (size_t i = 0; i < EVENT_RING; i++)
		free(c->ring[i].bytes);
	free(c->nodes);
	kvm_ledger_destroy(c->ledger);
	pthread_cond_destroy(&c->stop_cv);
	pthread_cond_destroy(&c->event_cv);
	pthread_mutex_destroy(&c->mu);
	free(c);
}
