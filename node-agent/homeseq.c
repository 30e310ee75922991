/* Home sequences: this agent is the home (rManager) of a sequence when the
 * coordinator made it so. It keeps the sequence's block table (fetched once
 * with GetSequence: node and handle of every full block) and its mutable
 * tail, which is always local: a kvs tail of its own kvs sequence, with one
 * fill position per layer.
 *
 * Appends write into the tail under hs->mu (the loop thread or the home
 * pool). When the tail is full and another token arrives, the tail becomes a
 * SEALING entry of the table (its bytes stay local and attention reads them
 * there) and a new tail starts; a seal job on the home pool then makes sure
 * the coordinator has a placement for that index (ExtendSequence), stores the
 * block there (locally, or with the holder's Agent.PutBlocks), and swaps the
 * entry for the stored handle. A seal that fails leaves the block SEALING:
 * still correct, just not where the ledger wanted it; it is logged.
 *
 * Attends run on the home pool (one thread, FIFO: a seal queued before an
 * attend has finished when the attend runs, and nothing else frees a tail):
 * the local partial (local blocks, SEALING blocks, the tail) plus one ATTEND
 * per peer holding blocks of the batch, all in flight at once, merged local
 * first and then by node id. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/addr.h"
#include "common/log.h"
#include "coordinator/links.h"
#include "node-agent/agent.h"
#include "transport/rdma_xport.h"

#define HS_MAX_PEERS 256
#define HANDOFF_GRACE_MS 3000
/* The target's adoption gives up waiting for blocks after ADOPT_WAIT_MS and
 * never makes itself the home after ADOPT_BUDGET_MS; the old home waits
 * ADOPT_CALL_MS for its answer, longer than all of that, so that when it
 * hears nothing and the coordinator still names it, no adoption can still
 * happen behind its back. */
#define ADOPT_WAIT_MS 2000
#define ADOPT_BUDGET_MS 6000
#define ADOPT_CALL_MS 15000
/* Moving, no hand-off call out, outcome unknown: take it back (or learn it
 * went) this long after the last call ended. */
#define HANDOFF_STUCK_MS 5000
#define PENDING_CHECK_MS 5000  /* an adoption whose outcome is unknown: ask again */
#define HS_BUCKETS 1024
#define ID_MAX 256

struct peer {
	char node_id[ID_MAX];
	char data_addr[ID_MAX];
	char grpc_addr[ID_MAX];
	xport_peer *xp;       /* home pool only */
	kvm_rpc_channel *ch;  /* made on the home pool, closed at the end */
	nic_report *nics;     /* from ListNodes; NULL: not learned yet */
	bool xp_rdma;         /* xp is an RDMA peer (home pool only) */
	bool rdma_refused;    /* an RDMA dial failed where TCP worked: TCP from now on */
};

enum { HB_LOCAL = 0, HB_REMOTE = 1, HB_SEALING = 2 };

struct hblock {
	uint8_t where;
	int peer;          /* REMOTE */
	wire_handle h;     /* LOCAL, REMOTE */
	kvs_seq_id tail_id; /* SEALING: the old tail's kvs sequence */
	void *ptr;          /* SEALING: its bytes */
};

struct hseq {
	uint64_t data_id;
	char id[ID_MAX];
	struct hblock *blk;
	uint32_t n_full, cap;
	char **placed; /* the coordinator's node for each index */
	uint32_t n_placed, cap_placed;
	kvs_seq_id tail_id;
	void *tail; /* NULL: no tail yet */
	uint32_t *fill; /* per layer */
	/* A drain hands it to another home (moved_to): appends are refused
	 * from the moment its tail is copied. Attends are still served here for
	 * HANDOFF_GRACE_MS after the hand-off (handed_off_ms): one whose append
	 * landed just before the copy finds its row here. */
	bool moving;
	char moved_to[ID_MAX];
	uint64_t moving_since_ms, handed_off_ms;
	uint32_t handoff_calls; /* hand-off calls out for it (handoff_call) */
	/* Adopted, but whether the coordinator switched the home here is not
	 * known yet (its answer was lost): kept until it can say, since the
	 * switch, at this home epoch, may still happen (homeseq_expire). */
	uint64_t pending_epoch, pending_since_ms;
	/* This agent registered again (it was declared dead, or the coordinator
	 * restarted): the coordinator may have degraded the sequence meanwhile;
	 * asked before it is served again (hs_get). */
	bool recheck;
	struct hseq *next;
};

struct homeseqs {
	pthread_mutex_t mu; /* the map, every sequence's table and tail, peer names */
	struct hseq *bucket[HS_BUCKETS];
	uint32_t count;
	struct peer peers[HS_MAX_PEERS];
	uint32_t n_peers;
	kvs_seq_id next_tail_id;
	uint32_t *dummy_tokens; /* block_tokens zeros: kvs tails want token ids */
	/* Failpoint for the tests (KVMESH_TEST_ADOPT_PAUSE_MS): an adoption
	 * waits this long before its switch, so that a test can make the
	 * coordinator unreachable at that moment. 0 in production. */
	unsigned adopt_pause_ms;
};

/* ---- the map and peers (under hs->mu) ---------------------------------------- */

static struct hseq *hs_find(homeseqs *hs, uint64_t id)
{
	struct hseq *q = hs->bucket[id % HS_BUCKETS];
	while (q && q->data_id != id)
		q = q->next;
	return q;
}

static int peer_of(homeseqs *hs, const char *node, const char *data_addr)
{
	for (uint32_t i = 0; i < hs->n_peers; i++)
		if (strcmp(hs->peers[i].node_id, node) == 0) {
			if (data_addr && data_addr[0])
				snprintf(hs->peers[i].data_addr, ID_MAX, "%s", data_addr);
			return (int)i;
		}
	if (hs->n_peers == HS_MAX_PEERS)
		return -ENOSPC;
	struct peer *p = &hs->peers[hs->n_peers];
	memset(p, 0, sizeof *p);
	snprintf(p->node_id, ID_MAX, "%s", node);
	snprintf(p->data_addr, ID_MAX, "%s", data_addr ? data_addr : "");
	return (int)hs->n_peers++;
}

/* Closes a peer's data-plane connection (home pool, or at the end). */
static void peer_drop(agent *a, struct peer *p)
{
	if (!p->xp)
		return;
	xport_close(p->xp);
	p->xp = NULL;
	if (p->xp_rdma)
		__atomic_fetch_sub(&a->rdma_peers, 1, __ATOMIC_RELAXED);
	p->xp_rdma = false;
}

static void hseq_free(agent *a, struct hseq *q)
{
	for (uint32_t i = 0; i < q->n_full; i++)
		if (q->blk[i].where == HB_SEALING)
			kvs_seq_release(a->store, q->blk[i].tail_id);
	if (q->tail)
		kvs_seq_release(a->store, q->tail_id);
	for (uint32_t i = 0; i < q->n_placed; i++)
		free(q->placed[i]);
	free(q->placed);
	free(q->blk);
	free(q->fill);
	free(q);
}

static int placed_set(struct hseq *q, uint32_t index, const char *node)
{
	if (index >= q->cap_placed) {
		uint32_t cap = q->cap_placed ? q->cap_placed : 8;
		while (cap <= index)
			cap *= 2;
		char **p = realloc(q->placed, cap * sizeof *p);
		if (!p)
			return -ENOMEM;
		memset(p + q->cap_placed, 0, (cap - q->cap_placed) * sizeof *p);
		q->placed = p;
		q->cap_placed = cap;
	}
	free(q->placed[index]);
	if (!(q->placed[index] = strdup(node)))
		return -ENOMEM;
	if (index >= q->n_placed)
		q->n_placed = index + 1;
	return 0;
}

static int blk_reserve(struct hseq *q)
{
	if (q->n_full < q->cap)
		return 0;
	uint32_t cap = q->cap ? q->cap * 2 : 8;
	struct hblock *b = realloc(q->blk, cap * sizeof *b);
	if (!b)
		return -ENOMEM;
	q->blk = b;
	q->cap = cap;
	return 0;
}

int homeseq_create(agent *a)
{
	homeseqs *hs = calloc(1, sizeof *hs);
	if (!hs || !(hs->dummy_tokens = calloc(a->geom.block_tokens, sizeof(uint32_t)))) {
		free(hs);
		return -ENOMEM;
	}
	pthread_mutex_init(&hs->mu, NULL);
	const char *pause = getenv("KVMESH_TEST_ADOPT_PAUSE_MS");
	hs->adopt_pause_ms = pause ? (unsigned)strtoul(pause, NULL, 10) : 0;
	/* Tails' kvs sequence ids: far from anything else that could use the
	 * store's sequence table. */
	hs->next_tail_id = 1ull << 62;
	a->hs = hs;
	return 0;
}

void homeseq_destroy(agent *a)
{
	homeseqs *hs = a->hs;
	if (!hs)
		return;
	for (uint32_t b = 0; b < HS_BUCKETS; b++)
		while (hs->bucket[b]) {
			struct hseq *q = hs->bucket[b];
			hs->bucket[b] = q->next;
			hseq_free(a, q);
		}
	for (uint32_t i = 0; i < hs->n_peers; i++) {
		peer_drop(a, &hs->peers[i]);
		if (hs->peers[i].ch)
			kvm_rpc_channel_close(hs->peers[i].ch);
		free(hs->peers[i].nics);
	}
	pthread_mutex_destroy(&hs->mu);
	free(hs->dummy_tokens);
	free(hs);
	a->hs = NULL;
}

void homeseq_recheck_all(agent *a)
{
	homeseqs *hs = a->hs;
	pthread_mutex_lock(&hs->mu);
	for (uint32_t b = 0; b < HS_BUCKETS; b++)
		for (struct hseq *q = hs->bucket[b]; q; q = q->next)
			q->recheck = true;
	pthread_mutex_unlock(&hs->mu);
}

uint32_t homeseq_count(agent *a)
{
	pthread_mutex_lock(&a->hs->mu);
	uint32_t n = a->hs->count;
	pthread_mutex_unlock(&a->hs->mu);
	return n;
}

/* ---- learning a sequence from the coordinator ------------------------------------ */

/* Finds the sequence, or fetches it with GetSequence (by id when seq_id is
 * given, else by data_id). Blocks while it asks. 0, or a negative errno with
 * err saying why. */
/* The coordinator's record of a sequence (by id, or by data_id when seq_id
 * is NULL); NULL with *rc and err saying why. */
static Kvmesh__V1__Sequence *get_sequence(agent *a, const char *seq_id, uint64_t data_id, int *rc,
					   char *err, size_t err_len)
{
	Kvmesh__V1__GetSequenceRequest req = KVMESH__V1__GET_SEQUENCE_REQUEST__INIT;
	req.sequence_id = (char *)(seq_id ? seq_id : "");
	req.data_id = seq_id ? 0 : data_id;
	void *resp = NULL;
	size_t len;
	char msg[512];
	int code = agent_coord_call(a, "GetSequence", &req.base, &resp, &len, msg, sizeof msg);
	if (code != KVM_RPC_OK) {
		snprintf(err, err_len, "sequence %.120s (data_id %#" PRIx64 "): coordinator: %.120s",
			 seq_id ? seq_id : "?", data_id, msg);
		*rc = code == KVM_RPC_NOT_FOUND ? -ENOENT : -EAGAIN;
		return NULL;
	}
	Kvmesh__V1__Sequence *s = kvmesh__v1__sequence__unpack(NULL, len, resp);
	free(resp);
	if (!s) {
		snprintf(err, err_len, "coordinator: malformed Sequence");
		*rc = -EPROTO;
	}
	return s;
}

/* Builds a sequence's home state from the coordinator's record (block
 * table; no tail yet), which must name `home` as its home (this agent, or
 * the draining one it adopts the sequence from); not in the map yet. A
 * record naming another home is -EXDEV: the sequence moved. */
static int hs_fetch(agent *a, const char *seq_id, uint64_t data_id, const char *home,
		    struct hseq **out, char *err, size_t err_len)
{
	homeseqs *hs = a->hs;
	*out = NULL;
	int rc = 0;
	Kvmesh__V1__Sequence *s = get_sequence(a, seq_id, data_id, &rc, err, err_len);
	if (!s)
		return rc;
	uint32_t bt = a->geom.block_tokens;
	struct hseq *q = calloc(1, sizeof *q);
	if (!q || !(q->fill = calloc(a->geom.layers, sizeof *q->fill))) {
		rc = -ENOMEM;
		goto out;
	}
	q->data_id = agent_data_id(s->id);
	snprintf(q->id, sizeof q->id, "%s", s->id);
	if (strcmp(s->model_id, a->model_id) != 0 || q->data_id != data_id) {
		snprintf(err, err_len, "sequence %.80s: model %.80s: not this agent's (%.80s)", s->id,
			 s->model_id, a->model_id);
		rc = -EINVAL;
		goto out;
	}
	if (strcmp(s->home_node, home) != 0) {
		snprintf(err, err_len, "sequence %.80s is homed on %.80s, not %.80s: ask the coordinator",
			 s->id, s->home_node, home);
		rc = -EXDEV;
		goto out;
	}
	if (s->degraded) {
		/* Its tail or blocks went with a node: attention over what is left
		 * would be silently wrong. */
		snprintf(err, err_len,
			 "sequence %.80s is degraded (KV lost with a node that died or restarted): "
			 "release it, or prefill it again", s->id);
		rc = -ENODATA;
		goto out;
	}
	pthread_mutex_lock(&hs->mu);
	/* Full blocks are the leading run that holders have reported. */
	for (size_t i = 0; rc == 0 && i < s->n_blocks; i++) {
		const Kvmesh__V1__BlockPlacement *p = s->blocks[i];
		if ((rc = placed_set(q, p->index, p->node_id)))
			break;
		if (p->index != q->n_full || !p->handle || !(p->handle->generation & 1) ||
		    p->tokens != bt)
			continue;
		if ((rc = blk_reserve(q)))
			break;
		struct hblock *b = &q->blk[q->n_full];
		memset(b, 0, sizeof *b);
		b->h = (wire_handle){.slot = p->handle->slot, .gen = p->handle->generation,
				     .arena = WIRE_ARENA_HOST};
		if (strcmp(p->node_id, a->node_id) == 0) {
			b->where = HB_LOCAL;
		} else {
			b->where = HB_REMOTE;
			if ((b->peer = peer_of(hs, p->node_id, p->data_address)) < 0) {
				rc = b->peer;
				break;
			}
		}
		q->n_full++;
	}
	pthread_mutex_unlock(&hs->mu);
	if (rc == -ENOMEM)
		snprintf(err, err_len, "out of memory");
out:
	if (rc == 0)
		*out = q;
	else if (q)
		hseq_free(a, q);
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return rc;
}

/* Puts q in the map unless another thread did first; returns the one there. */
static struct hseq *hs_insert(agent *a, struct hseq *q)
{
	homeseqs *hs = a->hs;
	pthread_mutex_lock(&hs->mu);
	struct hseq *other = hs_find(hs, q->data_id);
	if (!other) {
		q->next = hs->bucket[q->data_id % HS_BUCKETS];
		hs->bucket[q->data_id % HS_BUCKETS] = q;
		hs->count++;
		kvm_log(KVM_LOG_INFO, "home_sequence", "seq=%s data_id=%#" PRIx64 " full_blocks=%u placed=%u",
			q->id, q->data_id, q->n_full, q->n_placed);
	}
	pthread_mutex_unlock(&hs->mu);
	if (other)
		hseq_free(a, q); /* another thread learnt it meanwhile */
	return other ? other : q;
}

/* The home state of a sequence: known here, or fetched from the
 * coordinator (once per sequence). */
static int hs_get(agent *a, const char *seq_id, uint64_t data_id, struct hseq **out, char *err,
		  size_t err_len)
{
	homeseqs *hs = a->hs;
	if (seq_id)
		data_id = agent_data_id(seq_id);
	pthread_mutex_lock(&hs->mu);
	struct hseq *q = hs_find(hs, data_id);
	bool recheck = q && q->recheck;
	pthread_mutex_unlock(&hs->mu);
	if (q && recheck) {
		int rc = 0;
		Kvmesh__V1__Sequence *s = get_sequence(a, NULL, data_id, &rc, err, err_len);
		if (s && s->degraded) {
			snprintf(err, err_len,
				 "sequence %.80s is degraded (this node was declared dead meanwhile): "
				 "release it, or prefill it again", s->id);
			rc = -ENODATA;
		}
		if (s)
			kvmesh__v1__sequence__free_unpacked(s, NULL);
		if (rc == -ENODATA || rc == -ENOENT) {
			homeseq_release(a, NULL, data_id); /* on the home pool */
			return rc;
		}
		if (rc)
			return -EAGAIN; /* err says why; asked again next time */
		pthread_mutex_lock(&hs->mu);
		if (hs_find(hs, data_id) == q)
			q->recheck = false;
		pthread_mutex_unlock(&hs->mu);
	}
	if (q) {
		*out = q;
		return 0;
	}
	int rc = hs_fetch(a, seq_id, data_id, a->node_id, &q, err, err_len);
	if (rc == 0)
		*out = hs_insert(a, q);
	return rc;
}

/* ---- appending and sealing ---------------------------------------------------------- */

struct seal_job {
	agent *a;
	uint64_t data_id;
	uint32_t index;
};

static void seal_run(void *arg, da_ctx *ctx);

/* Under hs->mu. */
static int tail_new(agent *a, struct hseq *q)
{
	homeseqs *hs = a->hs;
	kvs_seq_id id = hs->next_tail_id++;
	int rc = kvs_seq_create(a->store, id);
	kvs_tail_view v;
	if (rc == 0 &&
	    (rc = kvs_seq_append(a->store, id, hs->dummy_tokens, a->geom.block_tokens, &v)) != 0)
		kvs_seq_release(a->store, id);
	if (rc)
		return rc;
	q->tail_id = id;
	q->tail = v.ptr;
	memset(q->fill, 0, a->geom.layers * sizeof *q->fill);
	return 0;
}

/* Why an append of one token at position token (-1: the next one) to
 * layer would be refused (-EXDEV: moving; -EINVAL), or 0; changes nothing.
 * Under hs->mu. */
static int append_check_locked(agent *a, const struct hseq *q, uint32_t layer, int64_t token,
			       char *err, size_t err_len)
{
	const kvs_geom *g = &a->geom;
	uint32_t bt = g->block_tokens;
	uint64_t next = (uint64_t)q->n_full * bt + (q->tail ? q->fill[layer] : 0);
	if (q->moving) {
		snprintf(err, err_len, "sequence %.120s is moving to %.120s: ask the coordinator for its home",
			 q->id, q->moved_to);
		return -EXDEV;
	}
	if (token >= 0 && (uint64_t)token != next) {
		snprintf(err, err_len, "sequence %.120s layer %u: token %" PRId64 ", the next is %" PRIu64,
			 q->id, layer, token, next);
		return -EINVAL;
	}
	if (q->tail && q->fill[layer] == bt)
		for (uint32_t l = 0; l < g->layers; l++)
			if (q->fill[l] != bt) {
				snprintf(err, err_len,
					 "sequence %.120s: layer %u starts a new block while layer %u has %u "
					 "of %u tokens",
					 q->id, layer, l, q->fill[l], bt);
				return -EINVAL;
			}
	return 0;
}

/* Appends n tokens of one layer (append_check_locked passed for the
 * first). Under hs->mu; *n_seals gets the indexes whose seal must be
 * queued. */
static int append_locked(agent *a, struct hseq *q, uint32_t layer, uint32_t n, const uint8_t *k,
			 const uint8_t *v, uint32_t *seals, uint32_t *n_seals, char *err,
			 size_t err_len)
{
	const kvs_geom *g = &a->geom;
	uint32_t bt = g->block_tokens;
	size_t row = (size_t)g->kv_heads * g->head_dim * kvs_geom_elem_bytes(g);
	for (uint32_t t = 0; t < n; t++) {
		if (q->tail && q->fill[layer] == bt) {
			int rc = t ? append_check_locked(a, q, layer, -1, err, err_len) : 0;
			if (rc)
				return rc;
			rc = blk_reserve(q);
			if (rc)
				return rc;
			q->blk[q->n_full++] = (struct hblock){.where = HB_SEALING,
							      .tail_id = q->tail_id,
							      .ptr = q->tail};
			seals[(*n_seals)++] = q->n_full - 1;
			q->tail = NULL;
		}
		if (!q->tail) {
			int rc = tail_new(a, q);
			if (rc) {
				snprintf(err, err_len, "sequence %.120s: no slot for a new tail: %.120s", q->id,
					 strerror(-rc));
				return rc;
			}
		}
		uint8_t *base = q->tail;
		uint32_t pos = q->fill[layer];
		memcpy(base + kvs_geom_offset(g, layer, 0, pos, 0), k + t * row, row);
		memcpy(base + kvs_geom_offset(g, layer, 1, pos, 0), v + t * row, row);
		q->fill[layer]++;
	}
	return 0;
}

static void queue_seals(agent *a, uint64_t data_id, const uint32_t *seals, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		struct seal_job *j = malloc(sizeof *j);
		if (j)
			*j = (struct seal_job){a, data_id, seals[i]};
		if (!j || wpool_submit(a->home, seal_run, j) != 0) {
			free(j);
			kvm_log(KVM_LOG_WARN, "seal_not_queued", "data_id=%#" PRIx64 " index=%u", data_id,
				seals[i]);
		}
	}
}

/* An append of n tokens seals at most n / block_tokens + 1 blocks. */
static int append(agent *a, const char *seq_id, uint64_t data_id, uint32_t layer, int64_t token,
		  uint32_t n, const void *k, const void *v, char *err, size_t err_len)
{
	struct hseq *q;
	int rc = hs_get(a, seq_id, data_id, &q, err, err_len);
	if (rc)
		return rc;
	uint32_t cap = n / a->geom.block_tokens + 2, n_seals = 0;
	uint32_t *seals = malloc(cap * sizeof *seals);
	if (!seals)
		return -ENOMEM;
	uint64_t did = seq_id ? agent_data_id(seq_id) : data_id;
	pthread_mutex_lock(&a->hs->mu);
	/* Looked up again: a ReleaseSequence may have dropped it meanwhile. */
	if (hs_find(a->hs, did) != q) {
		snprintf(err, err_len, "sequence %.120s was released", seq_id ? seq_id : "?");
		rc = -ENOENT;
	} else if ((rc = append_check_locked(a, q, layer, token, err, err_len)) == 0) {
		data_id = q->data_id;
		rc = append_locked(a, q, layer, n, k, v, seals, &n_seals, err, err_len);
	}
	pthread_mutex_unlock(&a->hs->mu);
	queue_seals(a, data_id, seals, n_seals);
	free(seals);
	return rc;
}

int homeseq_append_wire(agent *a, const wire_append_ref *ref, const void *k, const void *v)
{
	const kvs_geom *g = &a->geom;
	uint64_t data_id = (uint64_t)ref->h.gen << 32 | ref->h.slot;
	size_t row = (size_t)g->kv_heads * g->head_dim * kvs_geom_elem_bytes(g);
	char err[512] = "";
	int rc;
	if (ref->layer >= g->layers || ref->n_tokens == 0 ||
	    (uint64_t)ref->bytes != (uint64_t)ref->n_tokens * row) {
		snprintf(err, sizeof err, "layer %u, %u tokens, %u bytes: want layer < %u and %zu bytes a token",
			 ref->layer, ref->n_tokens, ref->bytes, g->layers, row);
		rc = -EINVAL;
	} else {
		/* A sequence not known yet is fetched here, on the loop thread: one
		 * coordinator round trip, once per sequence. */
		rc = append(a, NULL, data_id, ref->layer, ref->token, ref->n_tokens, k, v, err,
			    sizeof err);
	}
	if (rc)
		kvm_log(KVM_LOG_WARN, "append_refused", "data_id=%#" PRIx64 " error=\"%s\"", data_id,
			err[0] ? err : strerror(-rc));
	return rc;
}

/* Learns every peer's gRPC and data-plane addresses from ListNodes (a
 * placement read from the coordinator's store before the node registered
 * again carries no data address). Returns the call's status code. */
static int peers_refresh(agent *a, char *msg, size_t msg_len)
{
	homeseqs *hs = a->hs;
	Kvmesh__V1__ListNodesRequest req = KVMESH__V1__LIST_NODES_REQUEST__INIT;
	void *resp = NULL;
	size_t len;
	int code = agent_coord_call(a, "ListNodes", &req.base, &resp, &len, msg, msg_len);
	Kvmesh__V1__ListNodesResponse *r =
		code == KVM_RPC_OK ? kvmesh__v1__list_nodes_response__unpack(NULL, len, resp) : NULL;
	free(resp);
	pthread_mutex_lock(&hs->mu);
	for (size_t i = 0; r && i < r->n_nodes; i++)
		for (uint32_t k = 0; k < hs->n_peers; k++)
			if (strcmp(hs->peers[k].node_id, r->nodes[i]->id) == 0) {
				snprintf(hs->peers[k].grpc_addr, ID_MAX, "%s", r->nodes[i]->grpc_address);
				if (r->nodes[i]->data_address[0])
					snprintf(hs->peers[k].data_addr, ID_MAX, "%s", r->nodes[i]->data_address);
				/* The NICs it registered decide the transport to it. */
				if (!hs->peers[k].nics)
					hs->peers[k].nics = malloc(sizeof(nic_report));
				if (hs->peers[k].nics)
					kvm_nics_from_proto(r->nodes[i]->hardware, hs->peers[k].nics);
			}
	pthread_mutex_unlock(&hs->mu);
	if (r)
		kvmesh__v1__list_nodes_response__free_unpacked(r, NULL);
	return code;
}

static kvm_rpc_channel *peer_channel(agent *a, int p, char *err, size_t err_len)
{
	homeseqs *hs = a->hs;
	struct peer *pe = &hs->peers[p];
	if (pe->ch)
		return pe->ch;
	if (!pe->grpc_addr[0]) {
		char msg[512];
		int code = peers_refresh(a, msg, sizeof msg);
		if (!pe->grpc_addr[0]) {
			snprintf(err, err_len, "node %.120s: gRPC address unknown (%.120s)", pe->node_id,
				 code == KVM_RPC_OK ? "not listed" : msg);
			return NULL;
		}
	}
	if (kvm_rpc_channel_open(pe->grpc_addr, &pe->ch) != 0 ||
	    kvm_rpc_channel_set_token(pe->ch, a->token) != 0) {
		kvm_rpc_channel_close(pe->ch);
		pe->ch = NULL;
		snprintf(err, err_len, "node %.120s: bad gRPC address %.120s", pe->node_id, pe->grpc_addr);
		return NULL;
	}
	return pe->ch;
}

/* Stores a sealed block remotely with the holder's Agent.PutBlocks. */
static int seal_remote(agent *a, const char *seq_id, uint32_t index, const void *bytes, int p,
		       wire_handle *h, char *err, size_t err_len)
{
	kvm_rpc_channel *ch = peer_channel(a, p, err, err_len);
	if (!ch)
		return -EHOSTUNREACH;
	Kvmesh__V1__BlockData bd = KVMESH__V1__BLOCK_DATA__INIT, *bdp = &bd;
	bd.data.data = (uint8_t *)bytes;
	bd.data.len = a->block_bytes;
	Kvmesh__V1__PutBlocksRequest req = KVMESH__V1__PUT_BLOCKS_REQUEST__INIT;
	req.model_id = a->model_id;
	req.sequence_id = (char *)seq_id;
	req.first_index = index;
	req.n_blocks = 1;
	req.blocks = &bdp;
	void *resp = NULL;
	size_t len;
	char msg[512];
	int code = agent_peer_call(a, ch, "PutBlocks", &req.base, &resp, &len, msg, sizeof msg);
	Kvmesh__V1__PutBlocksResponse *r =
		code == KVM_RPC_OK ? kvmesh__v1__put_blocks_response__unpack(NULL, len, resp) : NULL;
	free(resp);
	int rc = 0;
	if (!r || r->n_handles != 1) {
		snprintf(err, err_len, "node %.120s: PutBlocks: %.120s", a->hs->peers[p].node_id,
			 code == KVM_RPC_OK ? "malformed reply" : msg);
		rc = -EIO;
	} else {
		*h = (wire_handle){.slot = r->handles[0]->slot, .gen = r->handles[0]->generation,
				   .arena = WIRE_ARENA_HOST};
	}
	if (r)
		kvmesh__v1__put_blocks_response__free_unpacked(r, NULL);
	return rc;
}

/* Asks the coordinator to place block `index` (ExtendSequence by one block's
 * tokens) and records the placements it returns. */
static int place_block(agent *a, struct hseq *q, const char *seq_id, char *err, size_t err_len)
{
	Kvmesh__V1__ExtendSequenceRequest req = KVMESH__V1__EXTEND_SEQUENCE_REQUEST__INIT;
	req.sequence_id = (char *)seq_id;
	req.tokens = a->geom.block_tokens;
	void *resp = NULL;
	size_t len;
	char msg[512];
	int code = agent_coord_call(a, "ExtendSequence", &req.base, &resp, &len, msg, sizeof msg);
	Kvmesh__V1__ExtendSequenceResponse *r =
		code == KVM_RPC_OK ? kvmesh__v1__extend_sequence_response__unpack(NULL, len, resp)
				   : NULL;
	free(resp);
	if (!r) {
		snprintf(err, err_len, "ExtendSequence: %.120s", code == KVM_RPC_OK ? "malformed" : msg);
		return -EAGAIN;
	}
	int rc = 0;
	pthread_mutex_lock(&a->hs->mu);
	for (size_t i = 0; rc == 0 && i < r->n_new_blocks; i++) {
		rc = placed_set(q, r->new_blocks[i]->index, r->new_blocks[i]->node_id);
		if (rc == 0 && strcmp(r->new_blocks[i]->node_id, a->node_id) != 0)
			peer_of(a->hs, r->new_blocks[i]->node_id, r->new_blocks[i]->data_address);
	}
	pthread_mutex_unlock(&a->hs->mu);
	kvmesh__v1__extend_sequence_response__free_unpacked(r, NULL);
	return rc;
}

static void seal_run(void *arg, da_ctx *ctx)
{
	struct seal_job *j = arg;
	agent *a = j->a;
	homeseqs *hs = a->hs;
	(void)ctx;
	char err[512] = "", seq_id[ID_MAX], node[ID_MAX] = "";
	const void *bytes = NULL;
	/* Only this thread drops sequences or seals: q and the SEALING bytes stay. */
	pthread_mutex_lock(&hs->mu);
	struct hseq *q = hs_find(hs, j->data_id);
	if (q && j->index < q->n_full && q->blk[j->index].where == HB_SEALING) {
		bytes = q->blk[j->index].ptr;
		snprintf(seq_id, sizeof seq_id, "%s", q->id);
	}
	bool placed = q && j->index < q->n_placed && q->placed[j->index];
	pthread_mutex_unlock(&hs->mu);
	if (!bytes) {
		free(j);
		return; /* released meanwhile */
	}
	int rc = 0;
	if (!placed && (rc = place_block(a, q, seq_id, err, sizeof err)) == 0) {
		pthread_mutex_lock(&hs->mu);
		placed = j->index < q->n_placed && q->placed[j->index];
		pthread_mutex_unlock(&hs->mu);
		if (!placed) {
			snprintf(err, sizeof err, "the coordinator placed no block %u", j->index);
			rc = -ENOENT;
		}
	}
	struct hblock nb = {0};
	if (rc == 0) {
		pthread_mutex_lock(&hs->mu);
		snprintf(node, sizeof node, "%s", q->placed[j->index]);
		int p = strcmp(node, a->node_id) == 0 ? -1 : peer_of(hs, node, NULL);
		pthread_mutex_unlock(&hs->mu);
		if (p == -1) {
			kvs_handle h;
			rc = blocks_store(a, seq_id, j->index, NULL, bytes, &h);
			if (rc == 0) {
				char msg[512];
				if (blocks_report(a, &h, 1, msg, sizeof msg) != KVM_RPC_OK)
					kvm_log(KVM_LOG_WARN, "seal_report_failed", "seq=%s index=%u reason=\"%s\"",
						seq_id, j->index, msg);
				nb = (struct hblock){.where = HB_LOCAL,
						     .h = {.slot = kvs_handle_slot(h),
							   .gen = kvs_handle_gen(h),
							   .arena = WIRE_ARENA_HOST}};
			} else {
				snprintf(err, sizeof err, "local store: %.120s", strerror(-rc));
			}
		} else if (p < 0) {
			rc = p;
			snprintf(err, sizeof err, "too many peers");
		} else {
			nb.where = HB_REMOTE;
			nb.peer = p;
			rc = seal_remote(a, seq_id, j->index, bytes, p, &nb.h, err, sizeof err);
		}
	}
	if (rc == 0) {
		pthread_mutex_lock(&hs->mu);
		kvs_seq_id old = q->blk[j->index].tail_id;
		q->blk[j->index] = nb;
		kvs_seq_release(a->store, old);
		pthread_mutex_unlock(&hs->mu);
		kvm_log(KVM_LOG_DEBUG, "sealed", "seq=%s index=%u node=%s", seq_id, j->index, node);
	} else {
		kvm_log(KVM_LOG_WARN, "seal_failed",
			"seq=%s index=%u node=%s error=\"%s\" msg=\"the block stays on its home\"",
			seq_id, j->index, node, err);
	}
	free(j);
}

/* ---- attention --------------------------------------------------------------------- */

/* One query of a home ATTEND. */
struct hq {
	const char *seq_id; /* NULL: by data_id */
	uint64_t data_id;
	int64_t n_tokens; /* expected, or -1 */
	const float *q;
	float *o, *lse;
	int st;
	char err[512];
	/* the peer whose partial failed (logged once the query's fate is known) */
	char peer[ID_MAX], peer_addr[ID_MAX];
	/* filled while it runs */
	struct hseq *seq;
	uint32_t n_local, n_tok_local;
	uint32_t first_local; /* into the local block arrays */
};

/* One peer's part of a batch. */
struct pcall {
	int peer;
	uint32_t n;                 /* queries */
	xport_attend_query *qs;
	uint32_t *qidx;             /* batch index of each */
	wire_handle *handles;       /* all queries' handles, in order */
	uint32_t **indexes;         /* per query: block indexes (for messages) */
	float *o, *lse;
	int status;
	xport_waiter *w;
};

static void pcall_cb(void *arg, int status)
{
	struct pcall *c = arg;
	c->status = status;
	xport_waiter_cb(c->w, status);
}

static bool conn_error(int rc)
{
	return rc == -ECONNRESET || rc == -ENOTCONN || rc == -ECANCELED || rc == -EPROTO ||
	       rc == -EBADMSG || rc == -ECONNREFUSED || rc == -EHOSTUNREACH;
}

/* Dials peer p's data server: over RDMA when this agent serves RDMA, the peer
 * registered an up RDMA port on a common fabric (xport_choose), and no earlier
 * RDMA dial to it failed where TCP worked; else over TCP. A failed RDMA dial
 * falls back to TCP at once, logged once per peer. */
static xport_peer *peer_conn(agent *a, int p, int *rc)
{
	struct peer *pe = &a->hs->peers[p];
	if (pe->xp)
		return pe->xp;
	char host[256];
	uint16_t port;
	if (!pe->data_addr[0] || (a->data_rdma && !pe->nics)) {
		char msg[512];
		peers_refresh(a, msg, sizeof msg);
	}
	if ((*rc = kvm_parse_addr(pe->data_addr, host, sizeof host, &port)) != 0)
		return NULL;
	xport_opts o;
	xport_opts_default(&o);
	o.node_id = agent_data_id(a->node_id);
	o.connect_timeout_ms = (uint32_t)a->attend_timeout_ms;
	o.auth_token = a->token;
	bool rdma = a->data_rdma && a->rdma_cli_dev && !pe->rdma_refused && pe->nics &&
		    xport_choose(&a->nics, pe->nics, NULL, NULL) == XPORT_KIND_RDMA;
	if (rdma) {
		xport_rdma_cfg cfg = {.dev = a->rdma_cli_dev, .mr = a->rdma_cli_mr};
		*rc = xport_rdma_connect(a->loop, host, port, &o, &cfg, &pe->xp);
		if (*rc == 0) {
			pe->xp_rdma = true;
			__atomic_fetch_add(&a->rdma_peers, 1, __ATOMIC_RELAXED);
			/* Not the peer's device: xport_choose's pick among the
			 * peer's NICs need not be the one its server uses. */
			kvm_log(KVM_LOG_INFO, "peer_transport", "peer=%s addr=%s transport=rdma device=%s",
				pe->node_id, pe->data_addr, xrdma_dev_name(a->rdma_cli_dev));
			return pe->xp;
		}
		pe->xp = NULL;
		int rrc = *rc;
		*rc = xport_connect(&xport_tcp_ops, a->loop, host, port, &o, &pe->xp);
		if (*rc) {
			pe->xp = NULL;
			return NULL; /* the peer is unreachable, not only its RDMA */
		}
		pe->rdma_refused = true;
		__atomic_fetch_add(&a->rdma_fallbacks, 1, __ATOMIC_RELAXED);
		kvm_log(KVM_LOG_WARN, "peer_rdma_fallback",
			"peer=%s addr=%s transport=tcp error=\"%s\" (RDMA dial failed; TCP from now on)",
			pe->node_id, pe->data_addr, strerror(-rrc));
		return pe->xp;
	}
	*rc = xport_connect(&xport_tcp_ops, a->loop, host, port, &o, &pe->xp);
	if (*rc) {
		pe->xp = NULL;
		return NULL;
	}
	kvm_log(KVM_LOG_DEBUG, "peer_transport", "peer=%s addr=%s transport=tcp", pe->node_id,
		pe->data_addr);
	return pe->xp;
}

static void append_indexes(char *buf, size_t cap, const uint32_t *idx, uint32_t n)
{
	size_t o = strlen(buf);
	for (uint32_t i = 0; i < n && o + 16 < cap; i++)
		o += (size_t)snprintf(buf + o, cap - o, "%s%u", i ? "," : "", idx[i]);
	if (o + 16 >= cap && cap > 4)
		snprintf(buf + cap - 4, 4, "...");
}

/* Runs a batch of home queries of one shape (on the home pool). */
static void attend_batch(agent *a, da_ctx *ctx, const da_shape *sh, struct hq *qs, uint32_t nq)
{
	homeseqs *hs = a->hs;
	uint32_t bt = a->geom.block_tokens;
	size_t row = (size_t)sh->q_heads * sh->head_dim;
	for (uint32_t i = 0; i < nq; i++)
		if (qs[i].st == 0)
			qs[i].st = hs_get(a, qs[i].seq_id, qs[i].data_id, &qs[i].seq, qs[i].err,
					  sizeof qs[i].err);
	/* Snapshot the tables under the lock: local pointers, per-peer handles. */
	uint32_t total = 0;
	pthread_mutex_lock(&hs->mu);
	for (uint32_t i = 0; i < nq; i++)
		if (qs[i].st == 0)
			total += qs[i].seq->n_full + 1;
	uint32_t np = hs->n_peers;
	const void **lptr = calloc(total + 1, sizeof *lptr);
	void **lpin = calloc(total + 1, sizeof *lpin);
	wire_handle *lh = calloc(total + 1, sizeof *lh);
	uint32_t *lstart = calloc(nq + 1, sizeof *lstart), *ltok = calloc(nq + 1, sizeof *ltok);
	struct pcall *pc = calloc(np + 1, sizeof *pc);
	/* per (query, peer): block count, then offsets */
	uint32_t *cnt = calloc((size_t)nq * (np + 1), sizeof *cnt);
	wire_handle *rh = calloc(total + 1, sizeof *rh);    /* remote handles, grouped per query */
	uint32_t *ridx = calloc(total + 1, sizeof *ridx);   /* their block indexes */
	int *rpeer = calloc(total + 1, sizeof *rpeer);
	uint32_t *rstart = calloc(nq + 1, sizeof *rstart);
	bool oom = !lptr || !lpin || !lh || !lstart || !ltok || !pc || !cnt || !rh || !ridx ||
		   !rpeer || !rstart;
	uint32_t nl = 0, nr = 0;
	uint8_t *is_local_handle = calloc(total + 1, 1);
	oom = oom || !is_local_handle;
	for (uint32_t i = 0; i < nq && !oom; i++) {
		lstart[i] = nl;
		rstart[i] = nr;
		struct hq *h = &qs[i];
		if (h->st)
			continue;
		struct hseq *q = h->seq;
		if (hs_find(hs, q->data_id) != q) {
			h->st = -ENOENT;
			snprintf(h->err, sizeof h->err, "sequence %.120s was released", q->id);
			continue;
		}
		uint32_t fill = q->tail ? q->fill[sh->layer] : 0;
		uint64_t tokens = (uint64_t)q->n_full * bt + fill;
		if (h->n_tokens >= 0 && (uint64_t)h->n_tokens != tokens) {
			h->st = -EINVAL;
			snprintf(h->err, sizeof h->err, "sequence %.120s layer %u: n_tokens %" PRId64 ", it has %" PRIu64,
				 q->id, sh->layer, h->n_tokens, tokens);
			continue;
		}
		for (uint32_t b = 0; b < q->n_full; b++) {
			const struct hblock *e = &q->blk[b];
			if (e->where == HB_SEALING) {
				lptr[nl++] = e->ptr;
			} else if (e->where == HB_LOCAL) {
				lh[nl] = e->h;
				is_local_handle[nl] = 1;
				nl++;
			} else {
				rh[nr] = e->h;
				ridx[nr] = b;
				rpeer[nr] = e->peer;
				cnt[(size_t)i * (np + 1) + e->peer]++;
				nr++;
			}
		}
		h->n_local = nl - lstart[i];
		if (fill)
			lptr[nl++] = q->tail;
		ltok[i] = h->n_local * bt + fill;
	}
	lstart[nq] = nl;
	rstart[nq] = nr;
	pthread_mutex_unlock(&hs->mu);
	if (oom) {
		for (uint32_t i = 0; i < nq; i++)
			if (qs[i].st == 0) {
				qs[i].st = -ENOMEM;
				snprintf(qs[i].err, sizeof qs[i].err, "out of memory");
			}
		goto out;
	}
	/* Local full blocks are read under a reader count (a release may come). */
	uint32_t n_pins = 0;
	for (uint32_t i = 0; i < nq; i++) {
		if (qs[i].st)
			continue;
		for (uint32_t k = lstart[i]; k < lstart[i + 1]; k++) {
			if (!is_local_handle[k])
				continue;
			int rc = blocks_read(a, &lh[k], &lptr[k], &lpin[n_pins]);
			if (rc) {
				qs[i].st = rc;
				snprintf(qs[i].err, sizeof qs[i].err,
					 "sequence %.120s: local block (slot %u) is gone: %.120s", qs[i].seq->id,
					 lh[k].slot, strerror(-rc));
				break;
			}
			n_pins++;
		}
	}
	/* One ATTEND per peer, every query with that peer's blocks, all in flight. */
	xport_waiter w;
	xport_waiter_init(&w);
	wire_shape ws = {.q_heads = sh->q_heads, .kv_heads = sh->kv_heads, .head_dim = sh->head_dim,
			 .block_tokens = bt, .layer = sh->layer, .kv_dtype = (uint32_t)sh->kv_dtype,
			 .scale = sh->scale};
	for (uint32_t p = 0; p < np; p++) {
		struct pcall *c = &pc[p];
		c->peer = (int)p;
		c->w = &w;
		for (uint32_t i = 0; i < nq; i++)
			if (qs[i].st == 0 && cnt[(size_t)i * (np + 1) + p])
				c->n++;
		if (!c->n)
			continue;
		c->qs = calloc(c->n, sizeof *c->qs);
		c->qidx = calloc(c->n, sizeof *c->qidx);
		c->indexes = calloc(c->n, sizeof *c->indexes);
		c->handles = calloc(nr, sizeof *c->handles);
		c->o = calloc((size_t)c->n * row, sizeof(float));
		c->lse = calloc((size_t)c->n * sh->q_heads, sizeof(float));
		uint32_t *idxs = calloc(nr, sizeof *idxs);
		if (!c->qs || !c->qidx || !c->indexes || !c->handles || !c->o || !c->lse || !idxs) {
			free(idxs);
			c->status = -ENOMEM;
			continue;
		}
		c->indexes[0] = idxs; /* one array, sliced per query */
		uint32_t k = 0, off = 0;
		for (uint32_t i = 0; i < nq; i++) {
			uint32_t m = cnt[(size_t)i * (np + 1) + p];
			if (qs[i].st || !m)
				continue;
			uint32_t at = off;
			for (uint32_t r = rstart[i]; r < rstart[i + 1]; r++)
				if (rpeer[r] == (int)p) {
					c->handles[off] = rh[r];
					idxs[off++] = ridx[r];
				}
			c->qs[k] = (xport_attend_query){.n_tokens = m * bt, .n_blocks = m,
							.blocks = c->handles + at, .q = qs[i].q,
							.o = c->o + (size_t)k * row,
							.lse = c->lse + (size_t)k * sh->q_heads};
			c->indexes[k] = idxs + at;
			c->qidx[k++] = i;
		}
		int rc;
		xport_peer *xp = peer_conn(a, (int)p, &rc);
		if (!xp) {
			c->status = rc;
			continue;
		}
		/* The callback may run before xport_attend returns: it owns
		 * c->status once the request is accepted. */
		xport_waiter_add(&w, 1);
		rc = xport_attend(xp, &ws, c->qs, c->n, (uint32_t)a->attend_timeout_ms, pcall_cb, c);
		if (rc) /* not accepted: the callback never runs */
			pcall_cb(c, rc);
	}
	/* Our own partial meanwhile. */
	float *lo = calloc((size_t)nq * row + 1, sizeof(float));
	float *ll = calloc((size_t)nq * sh->q_heads + 1, sizeof(float));
	int krc = -ENOMEM;
	if (lo && ll) {
		for (uint32_t i = 0; i < nq; i++)
			if (qs[i].st)
				ltok[i] = 0;
		/* Failed queries get empty lists: the starts are rebuilt. */
		const void **bp = calloc(nl + 1, sizeof *bp);
		uint32_t *st2 = calloc(nq + 1, sizeof *st2);
		float *qbuf = calloc((size_t)nq * row + 1, sizeof(float));
		if (bp && st2 && qbuf) {
			uint32_t m = 0;
			for (uint32_t i = 0; i < nq; i++) {
				st2[i] = m;
				memcpy(qbuf + i * row, qs[i].q, row * sizeof(float));
				if (qs[i].st)
					continue;
				for (uint32_t k = lstart[i]; k < lstart[i + 1]; k++)
					bp[m++] = lptr[k];
			}
			st2[nq] = m;
			da_batch b = {.n_queries = nq, .q = qbuf, .blocks = bp, .block_start = st2,
				      .n_tokens = ltok};
			krc = da_partial_cpu(ctx, sh, &b, lo, ll);
		}
		free(bp);
		free(st2);
		free(qbuf);
	}
	xport_waiter_wait(&w);
	xport_waiter_destroy(&w);
	/* Merge, or fail each query that lost a peer. */
	uint32_t *order = calloc(np + 1, sizeof *order);
	for (uint32_t p = 0; order && p < np; p++)
		order[p] = p;
	for (uint32_t x = 1; order && x < np; x++) /* by node id: a fixed merge order */
		for (uint32_t y = x; y > 0 && strcmp(hs->peers[order[y - 1]].node_id,
						     hs->peers[order[y]].node_id) > 0; y--) {
			uint32_t t = order[y];
			order[y] = order[y - 1];
			order[y - 1] = t;
		}
	const float **op = calloc(np + 2, sizeof *op), **lp = calloc(np + 2, sizeof *lp);
	for (uint32_t i = 0; i < nq; i++) {
		struct hq *h = &qs[i];
		if (h->st)
			continue;
		if (krc || !order || !op || !lp) {
			h->st = krc ? krc : -ENOMEM;
			snprintf(h->err, sizeof h->err, "local attention: %.120s", strerror(-h->st));
			continue;
		}
		uint32_t n = 0;
		op[n] = lo + i * row;
		lp[n++] = ll + (size_t)i * sh->q_heads;
		for (uint32_t x = 0; x < np && !h->st; x++) {
			struct pcall *c = &pc[order[x]];
			for (uint32_t k = 0; k < c->n; k++) {
				if (c->qidx[k] != i)
					continue;
				int rc = c->status ? c->status : c->qs ? c->qs[k].status : -ENOMEM;
				if (rc) {
					h->st = rc == -ETIMEDOUT ? -ETIMEDOUT : -EHOSTUNREACH;
					const struct peer *pe = &hs->peers[c->peer];
					snprintf(h->err, sizeof h->err,
						 "sequence %.80s: peer %.80s (%.80s): %.80s; lost blocks ", h->seq->id,
						 pe->node_id, pe->data_addr, strerror(-rc));
					append_indexes(h->err, sizeof h->err, c->indexes[k],
						       c->qs[k].n_blocks);
					snprintf(h->peer, sizeof h->peer, "%s", pe->node_id);
					snprintf(h->peer_addr, sizeof h->peer_addr, "%s", pe->data_addr);
					break;
				}
				op[n] = c->o + (size_t)k * row;
				lp[n++] = c->lse + (size_t)k * sh->q_heads;
			}
		}
		if (!h->st)
			h->st = da_merge_cpu(n, sh->q_heads, sh->head_dim, op, lp, h->o, h->lse);
	}
	free(op);
	free(lp);
	free(order);
	free(lo);
	free(ll);
	for (uint32_t p = 0; p < np; p++) {
		struct pcall *c = &pc[p];
		/* A dead connection is dropped here (never from a callback); the
		 * next batch dials again. */
		if (c->n && conn_error(c->status) && hs->peers[p].xp)
			peer_drop(a, &hs->peers[p]);
		if (c->indexes)
			free(c->indexes[0]);
		free(c->qs);
		free(c->qidx);
		free(c->indexes);
		free(c->handles);
		free(c->o);
		free(c->lse);
	}
	for (uint32_t k = 0; k < n_pins; k++)
		blocks_unread(a, lpin[k]);
out:
	free(lptr);
	free(lpin);
	free(lh);
	free(lstart);
	free(ltok);
	free(pc);
	free(cnt);
	free(rh);
	free(ridx);
	free(rpeer);
	free(rstart);
	free(is_local_handle);
}

/* ---- placements that moved (a drain) ------------------------------------------------ */

/* Fetches q's placements again: a drain moves blocks to other nodes and
 * then releases the old copies, which this table still names. Updates the
 * full blocks whose node or handle changed (not SEALING ones: their bytes
 * are here) and returns how many, or a negative errno. Home pool only. */
static int hs_refresh(agent *a, struct hseq *q)
{
	int rc = 0;
	char err[256];
	Kvmesh__V1__Sequence *s = get_sequence(a, q->id, 0, &rc, err, sizeof err);
	if (!s)
		return rc;
	homeseqs *hs = a->hs;
	int changed = 0;
	pthread_mutex_lock(&hs->mu);
	for (size_t i = 0; i < s->n_blocks && changed >= 0; i++) {
		const Kvmesh__V1__BlockPlacement *p = s->blocks[i];
		if (p->index >= q->n_full || !p->handle || !(p->handle->generation & 1) ||
		    p->tokens != a->geom.block_tokens)
			continue;
		struct hblock *b = &q->blk[p->index];
		if (b->where == HB_SEALING)
			continue;
		bool local = strcmp(p->node_id, a->node_id) == 0;
		int peer = local ? 0 : peer_of(hs, p->node_id, p->data_address);
		if (peer < 0) {
			changed = peer;
			break;
		}
		uint8_t where = local ? HB_LOCAL : HB_REMOTE;
		if (b->where == where && (local || b->peer == peer) && b->h.slot == p->handle->slot &&
		    b->h.gen == p->handle->generation)
			continue;
		b->where = where;
		b->peer = peer;
		b->h = (wire_handle){.slot = p->handle->slot, .gen = p->handle->generation,
				     .arena = WIRE_ARENA_HOST};
		placed_set(q, p->index, p->node_id);
		changed++;
	}
	pthread_mutex_unlock(&hs->mu);
	if (changed > 0)
		kvm_log(KVM_LOG_INFO, "home_sequence_moved", "seq=%s blocks=%d", q->id, changed);
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return changed;
}

/* attend_batch, and once more for the queries that lost a peer or a local
 * block if their placements changed meanwhile (a drain moved them). */
static void attend_batch_moved(agent *a, da_ctx *ctx, const da_shape *sh, struct hq *qs, uint32_t nq)
{
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	attend_batch(a, ctx, sh, qs, nq);
	struct hq *again = NULL;
	uint32_t *from = NULL, n = 0;
	for (uint32_t i = 0; i < nq; i++) {
		int st = qs[i].st;
		if (!qs[i].seq || (st != -EHOSTUNREACH && st != -ETIMEDOUT && st != -ESTALE && st != -ENOENT))
			continue;
		if (hs_refresh(a, qs[i].seq) <= 0)
			continue;
		if (!again) {
			again = calloc(nq, sizeof *again);
			from = calloc(nq, sizeof *from);
			if (!again || !from)
				break;
		}
		again[n] = qs[i];
		again[n].st = 0;
		again[n].err[0] = again[n].peer[0] = '\0';
		from[n++] = i;
	}
	if (again && from && n) {
		attend_batch(a, ctx, sh, again, n);
		for (uint32_t k = 0; k < n; k++)
			qs[from[k]] = again[k];
	}
	free(again);
	free(from);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	kvm_histogram_observe(&a->attend_latency,
			      (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000u + (uint64_t)t1.tv_nsec -
				      (uint64_t)t0.tv_nsec);
	uint32_t failed = 0;
	for (uint32_t i = 0; i < nq; i++)
		failed += qs[i].st != 0;
	__atomic_fetch_add(&a->attend_queries, nq, __ATOMIC_RELAXED);
	__atomic_fetch_add(&a->attend_failed, failed, __ATOMIC_RELAXED);
	/* Only now: a peer that failed before the placements were refreshed
	 * and the query ran again is no failure of the call. */
	for (uint32_t i = 0; i < nq; i++)
		if (qs[i].st && qs[i].peer[0] && qs[i].seq)
			kvm_log(KVM_LOG_WARN, "attend_peer_failed",
				"seq=%s peer=%s addr=%s error=\"%s\" msg=\"%s\"", qs[i].seq->id,
				qs[i].peer, qs[i].peer_addr, strerror(-qs[i].st), qs[i].err);
}

/* ---- the data plane's ATTEND on sequence handles ----------------------------------- */

struct wire_job {
	agent *a;
	const wire_attend_view *v;
	const float *q;
	float *o, *lse;
	int *st;
	xport_attend_token *tok;
};

static void wire_attend_run(void *arg, da_ctx *ctx)
{
	struct wire_job *j = arg;
	agent *a = j->a;
	const wire_attend_view *v = j->v;
	da_shape sh;
	int rc = agent_shape(a, &v->shape, &sh);
	struct hq *qs = rc ? NULL : calloc(v->n_queries, sizeof *qs);
	if (!rc && !qs)
		rc = -ENOMEM;
	if (rc == 0) {
		size_t row = (size_t)sh.q_heads * sh.head_dim;
		const uint8_t *cur = v->queries;
		for (uint32_t i = 0; i < v->n_queries; i++) {
			wire_attend_query wq;
			wire_attend_next(v, &cur, &wq);
			wire_handle h = {0};
			if (wq.n_blocks == 1)
				wire_attend_handle(&wq, 0, &h);
			qs[i] = (struct hq){.data_id = (uint64_t)h.gen << 32 | h.slot,
					    .n_tokens = wq.n_tokens, .q = j->q + i * row,
					    .o = j->o + i * row, .lse = j->lse + (size_t)i * sh.q_heads};
			if (wq.n_blocks != 1 || h.arena != WIRE_ARENA_SEQUENCE) {
				qs[i].st = -EINVAL;
				snprintf(qs[i].err, sizeof qs[i].err,
					 "a query naming a sequence has exactly one handle (arena %d)",
					 WIRE_ARENA_SEQUENCE);
			}
		}
		attend_batch_moved(a, ctx, &sh, qs, v->n_queries);
		for (uint32_t i = 0; i < v->n_queries; i++) {
			j->st[i] = qs[i].st;
			if (qs[i].st) {
				memset(qs[i].o, 0, row * sizeof(float));
				memset(qs[i].lse, 0, sh.q_heads * sizeof(float));
				kvm_log(KVM_LOG_WARN, "attend_failed", "data_id=%#" PRIx64 " error=\"%s\"",
					qs[i].data_id, qs[i].err[0] ? qs[i].err : strerror(-qs[i].st));
			}
		}
	}
	free(qs);
	xport_attend_complete(j->tok, rc);
	free(j);
}

int homeseq_attend_wire(agent *a, const wire_attend_view *v, const float *q, float *o, float *lse,
			int *st, xport_attend_token *tok)
{
	struct wire_job *j = malloc(sizeof *j);
	if (!j)
		return -ENOMEM;
	*j = (struct wire_job){a, v, q, o, lse, st, tok};
	int rc = wpool_submit(a->home, wire_attend_run, j);
	if (rc) {
		free(j);
		return rc;
	}
	return XPORT_DEFERRED;
}

/* ---- ReleaseSequence ------------------------------------------------------------------ */

struct drop_job {
	agent *a;
	uint64_t data_id;
};

/* Unlinks and frees a home sequence; home pool only (nothing else frees). */
static void hs_drop(agent *a, uint64_t data_id, const char *event)
{
	homeseqs *hs = a->hs;
	pthread_mutex_lock(&hs->mu);
	struct hseq **pp = &hs->bucket[data_id % HS_BUCKETS];
	while (*pp && (*pp)->data_id != data_id)
		pp = &(*pp)->next;
	struct hseq *q = *pp;
	if (q) {
		*pp = q->next;
		hs->count--;
		kvm_log(KVM_LOG_INFO, event, "seq=%s full_blocks=%u", q->id, q->n_full);
		hseq_free(a, q);
	}
	pthread_mutex_unlock(&hs->mu);
}

static void drop_run(void *arg, da_ctx *ctx)
{
	struct drop_job *j = arg;
	(void)ctx;
	hs_drop(j->a, j->data_id, "home_sequence_released");
	free(j);
}

void homeseq_release(agent *a, const char *seq_id, uint64_t data_id)
{
	struct drop_job *j = malloc(sizeof *j);
	if (!j)
		return;
	*j = (struct drop_job){a, seq_id && seq_id[0] ? agent_data_id(seq_id) : data_id};
	/* On the home pool, after the attends and seals queued before it. */
	if (wpool_submit(a->home, drop_run, j) != 0)
		free(j);
}

/* ---- hand-off: a drain gives the sequence another home ------------------------------ */

static int rpc_code(int err);

struct handoff_job {
	agent *a;
	uint64_t data_id;
	char seq_id[ID_MAX], target[ID_MAX], target_addr[ID_MAX];
	uint64_t home_epoch; /* from the HandOff (0: ask the coordinator) */
	unsigned requeued;
	bool counted; /* in the sequence's handoff_calls */
	/* Filled on the home pool for the call on the hand-off pool. */
	Kvmesh__V1__AdoptSequenceRequest req;
	uint32_t *fill;
	uint8_t *tail;
	kvm_rpc_channel *ch;
	int rc;
	char err[512];
};

/* The sequence's home as the coordinator names it now, into home[ID_MAX],
 * and its home epoch (when epoch is not NULL); 0, -ENOENT for a sequence it
 * does not know, or another error when it cannot say. */
static int home_now(agent *a, const char *seq_id, char *home, uint64_t *epoch)
{
	int rc = 0;
	char err[256];
	Kvmesh__V1__Sequence *s = get_sequence(a, seq_id, 0, &rc, err, sizeof err);
	if (!s)
		return rc ? rc : -EAGAIN;
	snprintf(home, ID_MAX, "%s", s->home_node);
	if (epoch)
		*epoch = s->home_epoch;
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return 0;
}

/* Takes back a sequence whose hand-off failed: MoveSequenceHome to this
 * node, which moves nothing but bumps the home epoch, so that a switch to
 * the target that reaches the coordinator late is refused. (No epoch is
 * named: while this node is the home, no switch can carry a later one.)
 * 0: ours again; -ESTALE: refused (another node is the home, or the
 * sequence is gone); -EAGAIN: no answer. */
static int take_back(agent *a, const char *seq_id)
{
	Kvmesh__V1__MoveSequenceHomeRequest mr = KVMESH__V1__MOVE_SEQUENCE_HOME_REQUEST__INIT;
	mr.sequence_id = (char *)seq_id;
	mr.from_node = mr.to_node = a->node_id;
	void *resp = NULL;
	size_t len;
	char msg[400];
	int code = agent_coord_call(a, "MoveSequenceHome", &mr.base, &resp, &len, msg, sizeof msg);
	free(resp);
	if (code == KVM_RPC_OK)
		return 0;
	kvm_log(KVM_LOG_INFO, "take_back_failed", "seq=%s error=\"%s\"", seq_id, msg);
	return code == KVM_RPC_FAILED_PRECONDITION || code == KVM_RPC_NOT_FOUND ? -ESTALE : -EAGAIN;
}

static void handoff_job_free(struct handoff_job *j)
{
	free(j->tail);
	free(j->fill);
	free(j);
}

/* The rest of a hand-off, on the hand-off pool, so that the home pool goes
 * on serving (and refusing the moving sequence's appends) while the target
 * answers, which may take ADOPT_CALL_MS. */
static void handoff_call(void *arg, da_ctx *ctx)
{
	struct handoff_job *j = arg;
	agent *a = j->a;
	homeseqs *hs = a->hs;
	(void)ctx;
	int rc = j->rc;
	char *err = j->err, home[ID_MAX] = "";
	uint64_t epoch = j->home_epoch;
	/* The record's epoch goes with the tail: the target's switch is refused
	 * once this node has taken the sequence back. The HandOff carries it;
	 * from an older coordinator, ask: a record that names another home
	 * already (an earlier attempt whose reply was lost) means it is done. */
	bool elsewhere = false;
	if (rc == 0 && !epoch && (rc = home_now(a, j->seq_id, home, &epoch)) != 0)
		snprintf(err, sizeof j->err, "the coordinator cannot say where %s is homed", j->seq_id);
	else if (rc == 0 && home[0])
		elsewhere = strcmp(home, a->node_id) != 0;
	if (rc == 0 && !elsewhere) {
		j->req.home_epoch = epoch;
		void *resp = NULL;
		size_t len;
		char msg[400];
		int code = agent_peer_call_ms(j->ch, "AdoptSequence", &j->req.base, ADOPT_CALL_MS, &resp,
					      &len, msg, sizeof msg);
		free(resp);
		if (code != KVM_RPC_OK) {
			rc = -EIO;
			snprintf(err, sizeof j->err, "%.100s: AdoptSequence: %.380s", j->target, msg);
		}
	}
	/* A failed call may hide an adoption that happened (a lost reply), or
	 * one still on its way to the coordinator: taking the sequence back
	 * settles which. Refused: the coordinator names another home, which
	 * holds the tail. No answer: the sequence stays moving (appends
	 * refused) until the coordinator can say (homeseq_expire, or the
	 * HandOff it sends again). */
	pthread_mutex_lock(&hs->mu);
	struct hseq *q = hs_find(hs, j->data_id);
	bool moving = q && q->moving && !q->handed_off_ms;
	if (q && j->counted && q->handoff_calls) {
		q->handoff_calls--;
		q->moving_since_ms = (uint64_t)agent_mono_ms(); /* the stuck clock starts now */
	}
	/* Another call for it is out (a HandOff sent again): its outcome decides. */
	bool others = q && q->handoff_calls;
	pthread_mutex_unlock(&hs->mu);
	bool still_ours = false;
	if (rc != 0 && moving && !others) {
		int tb = take_back(a, j->seq_id);
		still_ours = tb == 0;
		if (tb == -ESTALE && home_now(a, j->seq_id, home, NULL) != -EAGAIN)
			elsewhere = true; /* another home, or released */
	}
	if (rc == 0 || elsewhere) {
		pthread_mutex_lock(&hs->mu);
		if ((q = hs_find(hs, j->data_id)))
			q->handed_off_ms = (uint64_t)agent_mono_ms(); /* dropped by homeseq_expire */
		pthread_mutex_unlock(&hs->mu);
		__atomic_fetch_add(&a->hand_offs, 1, __ATOMIC_RELAXED);
		kvm_log(KVM_LOG_INFO, "hand_off", "seq=%s to=%s full_blocks=%u tail_tokens=%u", j->seq_id,
			home[0] && strcmp(home, a->node_id) ? home : j->target, j->req.full_blocks,
			j->req.n_fill ? j->fill[0] : 0);
	} else {
		pthread_mutex_lock(&hs->mu);
		if (still_ours && (q = hs_find(hs, j->data_id)))
			q->moving = false; /* serve it; the coordinator asks again */
		pthread_mutex_unlock(&hs->mu);
		__atomic_fetch_add(&a->hand_off_failures, 1, __ATOMIC_RELAXED);
		kvm_log(KVM_LOG_WARN, "hand_off_failed", "seq=%s to=%s error=\"%s\" appends=\"%s\"", j->seq_id,
			j->target, err[0] ? err : strerror(-rc),
			still_ours ? "taken again"
			: !moving  ? "not held here any more"
			: others   ? "left to the other hand-off call"
				   : "refused until the coordinator says");
	}
	handoff_job_free(j);
}

/* On the home pool, after the appends' seals queued before it: stops the
 * sequence's appends and copies its tail; the call to the target follows
 * on the hand-off pool. */
static void handoff_run(void *arg, da_ctx *ctx)
{
	struct handoff_job *j = arg;
	agent *a = j->a;
	homeseqs *hs = a->hs;
	const kvs_geom *g = &a->geom;
	Kvmesh__V1__AdoptSequenceRequest *req = &j->req;
	kvmesh__v1__adopt_sequence_request__init(req);
	req->sequence_id = j->seq_id;
	req->from_node = a->node_id;
	free(j->fill);
	free(j->tail);
	j->tail = NULL;
	j->fill = calloc(g->layers, sizeof *j->fill);
	char *err = j->err;
	int rc = j->fill ? 0 : -ENOMEM, p = -1, sealing = 0;
	struct hseq *q;
	/* Never used here yet: learn it (its full blocks) so the target can
	 * check it sees the same. */
	if (rc == 0)
		rc = hs_get(a, j->seq_id, j->data_id, &q, err, sizeof j->err);
	pthread_mutex_lock(&hs->mu);
	q = hs_find(hs, j->data_id);
	if (q && rc == 0) {
		q->moving = true; /* what is copied below is all it will have */
		q->moving_since_ms = (uint64_t)agent_mono_ms();
		if (!j->counted) {
			q->handoff_calls++; /* until handoff_call ends */
			j->counted = true;
		}
		snprintf(q->moved_to, sizeof q->moved_to, "%s", j->target);
		for (uint32_t i = 0; i < q->n_full; i++)
			sealing += q->blk[i].where == HB_SEALING;
		req->full_blocks = q->n_full;
		if (!sealing && q->tail) {
			if ((j->tail = malloc(a->block_bytes))) {
				memcpy(j->tail, q->tail, a->block_bytes);
				memcpy(j->fill, q->fill, g->layers * sizeof *j->fill);
				req->n_fill = g->layers;
				req->fill = j->fill;
				req->tail.data = j->tail;
				req->tail.len = a->block_bytes;
			} else {
				rc = -ENOMEM;
			}
		}
	}
	if (rc == 0 && (p = peer_of(hs, j->target, NULL)) >= 0 && !hs->peers[p].grpc_addr[0])
		snprintf(hs->peers[p].grpc_addr, ID_MAX, "%s", j->target_addr);
	pthread_mutex_unlock(&hs->mu);
	if (q && rc == 0 && !j->requeued)
		kvm_log(KVM_LOG_INFO, "hand_off_started", "seq=%s to=%s", j->seq_id, j->target);
	if (sealing && j->requeued++ < 16) {
		/* Seals queued after this job (by appends before it ran) go first. */
		if (wpool_submit(a->home, handoff_run, j) == 0)
			return;
		rc = -EAGAIN;
	}
	if (sealing && rc == 0) {
		rc = -EAGAIN;
		snprintf(err, sizeof j->err, "a block of %s is still sealing (a seal failed?)", j->seq_id);
	}
	if (rc == 0 && p < 0) {
		rc = p;
		snprintf(err, sizeof j->err, "too many peers");
	}
	/* Peers' channels are made here and closed only at the end: the
	 * hand-off pool may use this one. */
	if (rc == 0 && !(j->ch = peer_channel(a, p, err, sizeof j->err)))
		rc = -EHOSTUNREACH;
	j->rc = rc;
	if (wpool_submit(a->handoffs, handoff_call, j) != 0)
		handoff_call(j, ctx);
}

void homeseq_expire(agent *a)
{
	homeseqs *hs = a->hs;
	uint64_t now = (uint64_t)agent_mono_ms(), ids[64], pending_epoch[8];
	uint32_t n = 0, n_stuck = 0, n_pending = 0;
	char stuck[8][ID_MAX], pending[8][ID_MAX];
	pthread_mutex_lock(&hs->mu);
	for (uint32_t b = 0; b < HS_BUCKETS; b++)
		for (struct hseq *q = hs->bucket[b]; q; q = q->next) {
			if (q->handed_off_ms && now - q->handed_off_ms >= HANDOFF_GRACE_MS && n < 64) {
				ids[n++] = q->data_id;
				q->handed_off_ms = 0; /* one drop job each */
			} else if (q->moving && !q->handed_off_ms && !q->handoff_calls &&
				   now - q->moving_since_ms >= HANDOFF_STUCK_MS && n_stuck < 8) {
				snprintf(stuck[n_stuck++], ID_MAX, "%s", q->id);
				q->moving_since_ms = now; /* asked again later, not at once */
			} else if (q->pending_since_ms && now - q->pending_since_ms >= PENDING_CHECK_MS &&
				   n_pending < 8) {
				pending_epoch[n_pending] = q->pending_epoch;
				snprintf(pending[n_pending++], ID_MAX, "%s", q->id);
				q->pending_since_ms = now;
			}
		}
	pthread_mutex_unlock(&hs->mu);
	for (uint32_t i = 0; i < n; i++)
		homeseq_release(a, NULL, ids[i]);
	/* A hand-off whose outcome nobody could say, and that the coordinator
	 * did not send again (the drain was called off): taken back if it is
	 * still homed here, else dropped (the home named holds the tail). */
	for (uint32_t i = 0; i < n_stuck; i++) {
		int tb = take_back(a, stuck[i]);
		if (tb == -EAGAIN)
			continue;
		pthread_mutex_lock(&hs->mu);
		struct hseq *q = hs_find(hs, agent_data_id(stuck[i]));
		if (q && q->moving && !q->handed_off_ms) {
			if (tb == 0)
				q->moving = false;
			else
				q->handed_off_ms = now;
			kvm_log(KVM_LOG_INFO, "hand_off_settled", "seq=%s msg=\"%s\"", q->id,
				tb == 0 ? "still homed here: appends taken again"
					: "homed elsewhere: this copy goes");
		}
		pthread_mutex_unlock(&hs->mu);
	}
	/* Adoptions whose switch nobody could confirm: ours once the coordinator
	 * names this node; dropped once it names another home at a later epoch
	 * (the switch can no longer happen) or forgot the sequence. */
	for (uint32_t i = 0; i < n_pending; i++) {
		char home[ID_MAX] = "";
		uint64_t epoch = 0;
		int rc = home_now(a, pending[i], home, &epoch);
		if ((rc != 0 && rc != -ENOENT) ||
		    (rc == 0 && strcmp(home, a->node_id) != 0 && epoch == pending_epoch[i]))
			continue;
		bool ours = rc == 0 && strcmp(home, a->node_id) == 0;
		pthread_mutex_lock(&hs->mu);
		struct hseq *q = hs_find(hs, agent_data_id(pending[i]));
		if (q && ours)
			q->pending_since_ms = 0;
		pthread_mutex_unlock(&hs->mu);
		kvm_log(KVM_LOG_INFO, "adoption_settled", "seq=%s home=%s", pending[i], ours ? "here" : home);
		if (!ours)
			homeseq_release(a, pending[i], 0);
	}
}

void homeseq_hand_off(agent *a, const char *seq_id, uint64_t data_id, const char *target,
		      const char *target_addr, uint64_t home_epoch)
{
	struct handoff_job *j = calloc(1, sizeof *j);
	if (!j)
		return;
	j->a = a;
	j->data_id = seq_id && seq_id[0] ? agent_data_id(seq_id) : data_id;
	snprintf(j->seq_id, sizeof j->seq_id, "%s", seq_id ? seq_id : "");
	snprintf(j->target, sizeof j->target, "%s", target);
	snprintf(j->target_addr, sizeof j->target_addr, "%s", target_addr);
	j->home_epoch = home_epoch;
	if (wpool_submit(a->home, handoff_run, j) != 0)
		free(j);
}

/* The adoption's last step, once this agent holds the sequence: has the
 * coordinator make it the home, at the epoch the old home saw. A refusal
 * drops the copy. When nobody can say whether the switch happened (the
 * coordinator's answer was lost, and it may still apply the call), the copy
 * stays, pending, until the coordinator can say (homeseq_expire): if the
 * switch lands, the tail must be here. */
static int adopt_switch(agent *a, const Kvmesh__V1__AdoptSequenceRequest *r, uint64_t data_id,
			kvm_rpc_call *call)
{
	Kvmesh__V1__MoveSequenceHomeRequest mr = KVMESH__V1__MOVE_SEQUENCE_HOME_REQUEST__INIT;
	mr.sequence_id = r->sequence_id;
	mr.from_node = r->from_node;
	mr.to_node = a->node_id;
	mr.home_epoch = r->home_epoch;
	void *resp = NULL;
	size_t rlen;
	char msg[400], home[ID_MAX] = "";
	int mc = agent_coord_call(a, "MoveSequenceHome", &mr.base, &resp, &rlen, msg, sizeof msg);
	free(resp);
	uint64_t epoch = 0;
	int hn = mc == KVM_RPC_OK ? 0 : home_now(a, r->sequence_id, home, &epoch);
	bool ours = mc == KVM_RPC_OK || (hn == 0 && strcmp(home, a->node_id) == 0);
	bool refused = !ours && (mc == KVM_RPC_FAILED_PRECONDITION || mc == KVM_RPC_NOT_FOUND ||
				 mc == KVM_RPC_INVALID_ARGUMENT || hn == -ENOENT ||
				 (hn == 0 && epoch != r->home_epoch));
	pthread_mutex_lock(&a->hs->mu);
	struct hseq *q = hs_find(a->hs, data_id);
	if (q && ours) {
		q->pending_since_ms = 0;
	} else if (q && !refused) {
		q->pending_epoch = r->home_epoch;
		q->pending_since_ms = (uint64_t)agent_mono_ms();
	}
	pthread_mutex_unlock(&a->hs->mu);
	if (ours) {
		__atomic_fetch_add(&a->adoptions, 1, __ATOMIC_RELAXED);
		return KVM_RPC_OK;
	}
	if (refused)
		homeseq_release(a, r->sequence_id, data_id);
	else
		kvm_log(KVM_LOG_WARN, "adoption_pending", "seq=%s home_epoch=%" PRIu64 " error=\"%s\"",
			r->sequence_id, r->home_epoch, msg);
	return kvm_rpc_fail(call, mc, "coordinator: %s%s", msg,
			    refused ? "" : " (the copy is kept until the coordinator names the home)");
}

/* Agent.AdoptSequence, on the target: waits (briefly) until the coordinator
 * lists every full block the old home had, builds the home state from it,
 * installs the tail, and only then makes itself the home. */
int homeseq_rpc_adopt(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	agent *a = arg;
	const kvs_geom *g = &a->geom;
	Kvmesh__V1__AdoptSequenceRequest *r = kvmesh__v1__adopt_sequence_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed AdoptSequenceRequest");
	int code = KVM_RPC_OK;
	char err[512] = "";
	struct hseq *q = NULL;
	uint64_t data_id = r->sequence_id[0] ? agent_data_id(r->sequence_id) : 0;
	bool bad_fill = false;
	for (size_t i = 0; i < r->n_fill; i++)
		bad_fill |= r->fill[i] > g->block_tokens;
	if (!r->sequence_id[0] || !r->from_node[0]) {
		code = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "sequence_id and from_node are required");
	} else if (r->n_fill && (r->n_fill != g->layers || r->tail.len != a->block_bytes || bad_fill)) {
		code = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				    "a tail is %u fills of at most %u tokens and %zu bytes, not %zu and %zu",
				    g->layers, g->block_tokens, a->block_bytes, r->n_fill, r->tail.len);
	}
	pthread_mutex_lock(&a->hs->mu);
	struct hseq *held = code == KVM_RPC_OK ? hs_find(a->hs, data_id) : NULL;
	bool have = held != NULL;
	/* A copy from an attempt whose switch is pending at the same epoch:
	 * the old home has taken no append since, so it is this one. */
	bool same = held && held->pending_since_ms && r->home_epoch && held->pending_epoch == r->home_epoch;
	pthread_mutex_unlock(&a->hs->mu);
	char home[ID_MAX];
	int hn = have && !same ? home_now(a, r->sequence_id, home, NULL) : 0;
	if (same) {
		code = kvm_rpc_cancelled(call) ? kvm_rpc_fail(call, KVM_RPC_CANCELLED, "cancelled")
					       : adopt_switch(a, r, data_id, call);
	} else if (have && hn == 0 && strcmp(home, a->node_id) == 0) {
		/* Ours already (a reply that was lost): OK. */
	} else if (have && hn != 0 && hn != -ENOENT) {
		code = kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE,
				    "%s is held here and the coordinator cannot say its home; try again",
				    r->sequence_id);
	} else if (have) {
		/* A copy from an attempt whose outcome was unclear, never served
		 * (the home is not this node): dropped; the next attempt adopts
		 * afresh. */
		homeseq_release(a, r->sequence_id, data_id);
		code = kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE,
				    "an earlier adoption of %s is being dropped; try again",
				    r->sequence_id);
	}
	if (code == KVM_RPC_OK && !have) {
		/* The old home's last seals reported their blocks before it sent
		 * this; a report may still be on its way: a short wait. */
		int rc = 0;
		int64_t t0 = agent_mono_ms();
		for (int attempt = 0; agent_mono_ms() - t0 < ADOPT_WAIT_MS; attempt++) {
			if (attempt)
				usleep(50000);
			rc = hs_fetch(a, r->sequence_id, data_id, r->from_node, &q, err, sizeof err);
			if (rc != 0 || q->n_full >= r->full_blocks)
				break;
			hseq_free(a, q);
			q = NULL;
		}
		if (rc == 0 && !q) {
			rc = -EAGAIN;
			snprintf(err, sizeof err, "the coordinator lists fewer than the %u full blocks of %s",
				 r->full_blocks, r->sequence_id);
		} else if (rc == 0 && q->n_full != r->full_blocks) {
			rc = -EINVAL;
			snprintf(err, sizeof err, "sequence %s: %u full blocks here, %u on %s", r->sequence_id,
				 q->n_full, r->full_blocks, r->from_node);
		}
		if (rc == 0 && r->n_fill) {
			pthread_mutex_lock(&a->hs->mu);
			rc = tail_new(a, q);
			if (rc == 0) {
				memcpy(q->tail, r->tail.data, a->block_bytes);
				memcpy(q->fill, r->fill, g->layers * sizeof *q->fill);
			}
			pthread_mutex_unlock(&a->hs->mu);
			if (rc)
				snprintf(err, sizeof err, "no slot for the tail: %s", strerror(-rc));
		}
		if (rc == 0 && (kvm_rpc_cancelled(call) || agent_mono_ms() - t0 > ADOPT_BUDGET_MS)) {
			rc = -ETIMEDOUT; /* the old home no longer waits: it may serve it again */
			snprintf(err, sizeof err, "adoption of %s took too long", r->sequence_id);
		}
		if (rc == 0) {
			hs_insert(a, q);
			q = NULL;
			if (a->hs->adopt_pause_ms) {
				kvm_log(KVM_LOG_WARN, "adopt_paused", "seq=%s ms=%u msg=\"test failpoint\"",
					r->sequence_id, a->hs->adopt_pause_ms);
				usleep(a->hs->adopt_pause_ms * 1000u);
			}
			code = adopt_switch(a, r, data_id, call);
		} else {
			code = kvm_rpc_fail(call, rc == -EXDEV ? KVM_RPC_FAILED_PRECONDITION : rpc_code(rc),
					    "%s", err[0] ? err : strerror(-rc));
		}
	}
	if (q)
		hseq_free(a, q);
	if (code == KVM_RPC_OK) {
		Kvmesh__V1__AdoptSequenceResponse resp = KVMESH__V1__ADOPT_SEQUENCE_RESPONSE__INIT;
		uint8_t buf[16];
		kvm_rpc_reply(call, buf, kvmesh__v1__adopt_sequence_response__pack(&resp, buf));
		kvm_log(KVM_LOG_INFO, "home_adopted", "seq=%s from=%s tail_tokens=%u home_epoch=%" PRIu64,
			r->sequence_id, r->from_node, r->n_fill ? r->fill[0] : 0, r->home_epoch + 1);
	}
	kvmesh__v1__adopt_sequence_request__free_unpacked(r, NULL);
	return code;
}

/* ---- gRPC Agent.AttendAppend ------------------------------------------------------------ */

struct rpc_job {
	agent *a;
	Kvmesh__V1__AttendAppendRequest *r;
	da_shape sh;
	struct hq *qs;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool done;
};

static int64_t query_token(const Kvmesh__V1__AttendQuery *aq)
{
	return aq->position_case == KVMESH__V1__ATTEND_QUERY__POSITION_TOKEN ? (int64_t)aq->token : -1;
}

/* Whether every append of the batch would be taken; if not, the refused
 * query gets the status and nothing is appended: the front-end sends the
 * batch again (to the home GetSequence names) and no row lands twice. On
 * the home pool, so no hand-off or drop runs between this and the appends. */
static bool batch_appendable(agent *a, struct rpc_job *j)
{
	size_t n = j->r->n_queries;
	for (size_t i = 0; i < n; i++) {
		struct hq *h = &j->qs[i];
		struct hseq *q;
		if ((h->st = hs_get(a, j->r->queries[i]->sequence_id, 0, &q, h->err, sizeof h->err)))
			return false;
	}
	bool ok = true;
	pthread_mutex_lock(&a->hs->mu);
	for (size_t i = 0; ok && i < n; i++) {
		const Kvmesh__V1__AttendQuery *aq = j->r->queries[i];
		struct hq *h = &j->qs[i];
		const struct hseq *q = hs_find(a->hs, agent_data_id(aq->sequence_id));
		if (!q) {
			snprintf(h->err, sizeof h->err, "sequence %.120s was released", aq->sequence_id);
			h->st = -ENOENT;
		} else {
			h->st = append_check_locked(a, q, j->r->layer, query_token(aq), h->err,
						    sizeof h->err);
		}
		ok = h->st == 0;
	}
	pthread_mutex_unlock(&a->hs->mu);
	return ok;
}

static void rpc_run(void *arg, da_ctx *ctx)
{
	struct rpc_job *j = arg;
	agent *a = j->a;
	if (batch_appendable(a, j)) {
		for (size_t i = 0; i < j->r->n_queries; i++) {
			const Kvmesh__V1__AttendQuery *aq = j->r->queries[i];
			struct hq *h = &j->qs[i];
			h->st = append(a, aq->sequence_id, 0, j->r->layer, query_token(aq), 1,
				       aq->k_new.data, aq->v_new.data, h->err, sizeof h->err);
		}
		attend_batch_moved(a, ctx, &j->sh, j->qs, (uint32_t)j->r->n_queries);
	}
	pthread_mutex_lock(&j->mu);
	j->done = true;
	pthread_cond_signal(&j->cv);
	pthread_mutex_unlock(&j->mu);
}

static int rpc_code(int err)
{
	switch (err) {
	case -EINVAL:
		return KVM_RPC_INVALID_ARGUMENT;
	case -ENOENT:
		return KVM_RPC_NOT_FOUND;
	case -ENOSPC:
	case -ENOMEM:
		return KVM_RPC_RESOURCE_EXHAUSTED;
	case -ETIMEDOUT:
		return KVM_RPC_DEADLINE_EXCEEDED;
	case -EXDEV: /* homed elsewhere now: the caller asks the coordinator */
	case -ENODATA: /* degraded */
		return KVM_RPC_FAILED_PRECONDITION;
	default:
		return KVM_RPC_UNAVAILABLE;
	}
}

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
	return a < b ? -1 : a > b;
}

/* A batch names each sequence once: its queries all attend after all its
 * appends, so a second token of one sequence would change the first's
 * result. */
static int twice_in_batch(kvm_rpc_call *call, const Kvmesh__V1__AttendAppendRequest *r)
{
	uint64_t *ids = malloc(r->n_queries * sizeof *ids);
	if (!ids)
		return kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
	for (size_t i = 0; i < r->n_queries; i++)
		ids[i] = agent_data_id(r->queries[i]->sequence_id);
	qsort(ids, r->n_queries, sizeof *ids, cmp_u64);
	int rc = KVM_RPC_OK;
	for (size_t i = 1; i < r->n_queries && rc == KVM_RPC_OK; i++)
		if (ids[i] == ids[i - 1])
			for (size_t k = 0; k < r->n_queries; k++)
				if (agent_data_id(r->queries[k]->sequence_id) == ids[i]) {
					rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
							  "sequence \"%s\" is named twice in one batch: "
							  "send its next token in the next call",
							  r->queries[k]->sequence_id);
					break;
				}
	free(ids);
	return rc;
}

int homeseq_rpc_attend_append(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	agent *a = arg;
	const kvs_geom *g = &a->geom;
	Kvmesh__V1__AttendAppendRequest *r = kvmesh__v1__attend_append_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed AttendAppendRequest");
	int rc = KVM_RPC_OK;
	size_t row = (size_t)g->kv_heads * g->head_dim * kvs_geom_elem_bytes(g);
	size_t qn = (size_t)a->q_heads * g->head_dim;
	struct rpc_job j = {.a = a, .r = r};
	float *out = NULL;
	if (strcmp(r->model_id, a->model_id) != 0) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "model \"%s\": this agent holds %s",
				  r->model_id, a->model_id);
		goto done;
	}
	if (r->layer >= g->layers || r->n_queries == 0 || r->n_queries > 4096 ||
	    !(r->scale >= 0) || !isfinite(r->scale)) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				  "layer %u (model has %u), %zu queries (1..4096), scale %g", r->layer,
				  g->layers, r->n_queries, (double)r->scale);
		goto done;
	}
	for (size_t i = 0; i < r->n_queries; i++) {
		const Kvmesh__V1__AttendQuery *q = r->queries[i];
		if (!q->sequence_id[0] || q->n_q != qn || q->k_new.len != row || q->v_new.len != row) {
			rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
					  "query %zu (sequence \"%s\"): q has %zu floats, k_new %zu and "
					  "v_new %zu bytes; want %zu floats and %zu bytes",
					  i, q->sequence_id, q->n_q, q->k_new.len, q->v_new.len, qn, row);
			goto done;
		}
		if (q->position_case && q->token > INT64_MAX) {
			rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
					  "query %zu (sequence \"%s\"): token %" PRIu64 " is out of range", i,
					  q->sequence_id, q->token);
			goto done;
		}
	}
	if ((rc = twice_in_batch(call, r)) != KVM_RPC_OK)
		goto done;
	j.sh = (da_shape){.q_heads = a->q_heads, .kv_heads = g->kv_heads, .head_dim = g->head_dim,
			  .block_tokens = g->block_tokens, .layer = r->layer, .kv_dtype = g->dtype,
			  .scale = r->scale > 0 ? r->scale : 1.0f / sqrtf((float)g->head_dim)};
	j.qs = calloc(r->n_queries, sizeof *j.qs);
	out = calloc(r->n_queries * (qn + a->q_heads), sizeof(float));
	if (!j.qs || !out || da_shape_check(&j.sh)) {
		rc = kvm_rpc_fail(call, j.qs && out ? KVM_RPC_FAILED_PRECONDITION
						    : KVM_RPC_RESOURCE_EXHAUSTED,
				  j.qs && out ? "model shape unusable (q_heads %u)" : "out of memory",
				  a->q_heads);
		goto done;
	}
	for (size_t i = 0; i < r->n_queries; i++)
		j.qs[i] = (struct hq){.seq_id = r->queries[i]->sequence_id, .n_tokens = -1,
				      .q = r->queries[i]->q, .o = out + i * qn,
				      .lse = out + r->n_queries * qn + i * a->q_heads};
	pthread_mutex_init(&j.mu, NULL);
	pthread_cond_init(&j.cv, NULL);
	if (wpool_submit(a->home, rpc_run, &j) != 0) {
		rc = kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE, "the agent is stopping");
	} else {
		pthread_mutex_lock(&j.mu);
		while (!j.done)
			pthread_cond_wait(&j.cv, &j.mu);
		pthread_mutex_unlock(&j.mu);
		for (size_t i = 0; i < r->n_queries && rc == KVM_RPC_OK; i++)
			if (j.qs[i].st)
				rc = kvm_rpc_fail(call, rpc_code(j.qs[i].st), "query %zu: %s", i,
						  j.qs[i].err[0] ? j.qs[i].err : strerror(-j.qs[i].st));
	}
	pthread_mutex_destroy(&j.mu);
	pthread_cond_destroy(&j.cv);
	if (rc == KVM_RPC_OK) {
		Kvmesh__V1__AttendResult *res = calloc(r->n_queries, sizeof *res);
		Kvmesh__V1__AttendResult **rp = calloc(r->n_queries, sizeof *rp);
		uint8_t *buf = NULL;
		if (res && rp) {
			for (size_t i = 0; i < r->n_queries; i++) {
				kvmesh__v1__attend_result__init(&res[i]);
				res[i].sequence_id = r->queries[i]->sequence_id;
				res[i].n_o = qn;
				res[i].o = j.qs[i].o;
				res[i].n_lse = a->q_heads;
				res[i].lse = j.qs[i].lse;
				rp[i] = &res[i];
			}
			Kvmesh__V1__AttendAppendResponse resp = KVMESH__V1__ATTEND_APPEND_RESPONSE__INIT;
			resp.n_results = r->n_queries;
			resp.results = rp;
			size_t n = kvmesh__v1__attend_append_response__get_packed_size(&resp);
			if ((buf = malloc(n ? n : 1))) {
				kvmesh__v1__attend_append_response__pack(&resp, buf);
				kvm_rpc_reply(call, buf, n);
			}
		}
		if (!buf)
			rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
		free(buf);
		free(res);
		free(rp);
	}
done:
	free(j.qs);
	free(out);
	kvmesh__v1__attend_append_request__free_unpacked(r, NULL);
	return rc;
}
