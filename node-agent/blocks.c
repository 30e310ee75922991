/* Pinned blocks: the full blocks this agent holds for the cluster, each
 * pinned in the kvstore from PutBlocks (or a home sequence's seal) until the
 * coordinator releases it. A small map by arena slot remembers what each
 * pin was written for (sequence, index, tokens, key), for block reports.
 *
 * Handles given out are arena slots (slot, generation; arena 0 = the host
 * arena). A block read by GET or ATTEND holds a reader count, so a release
 * that arrives meanwhile unpins it only once the last reader is done. */
#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/addr.h"
#include "common/log.h"
#include "node-agent/agent.h"
#include "transport/rdma_xport.h"

#define SEQ_ID_MAX 256

struct pin_ent {
	kvs_block_id id;
	kvs_handle h;
	void *ptr;
	uint32_t pins;    /* kvs pins this entry holds */
	uint32_t readers; /* GETs and ATTENDs reading it now */
	uint32_t unpins;  /* releases waiting for the readers */
	bool gone;        /* out of the map: freed with the last reader */
	bool keyed;
	uint8_t key[16];
	uint32_t index, tokens;
	char seq_id[SEQ_ID_MAX];
};

struct blocks {
	pthread_mutex_t mu;
	struct pin_ent **by_slot; /* n_slots entries */
	uint32_t n_pins;
};

int blocks_create(agent *a)
{
	blocks *b = calloc(1, sizeof *b);
	if (!b || !(b->by_slot = calloc(a->n_slots, sizeof *b->by_slot))) {
		free(b);
		return -ENOMEM;
	}
	pthread_mutex_init(&b->mu, NULL);
	a->blk = b;
	return 0;
}

void blocks_destroy(agent *a)
{
	blocks *b = a->blk;
	if (!b)
		return;
	for (uint32_t i = 0; i < a->n_slots; i++)
		free(b->by_slot[i]);
	free(b->by_slot);
	pthread_mutex_destroy(&b->mu);
	free(b);
	a->blk = NULL;
}

uint32_t blocks_pinned(agent *a)
{
	pthread_mutex_lock(&a->blk->mu);
	uint32_t n = a->blk->n_pins;
	pthread_mutex_unlock(&a->blk->mu);
	return n;
}

int blocks_store(agent *a, const char *seq_id, uint32_t index, const kvs_key *key,
		 const void *bytes, kvs_handle *h)
{
	blocks *b = a->blk;
	struct pin_ent *fresh = calloc(1, sizeof *fresh);
	if (!fresh)
		return -ENOMEM;
	kvs_block_ref r;
	int rc = kvs_block_put(a->store, key, bytes, &r);
	if (rc) {
		free(fresh);
		return rc;
	}
	uint32_t slot = kvs_handle_slot(r.slot);
	pthread_mutex_lock(&b->mu);
	struct pin_ent *e = b->by_slot[slot];
	if (e && e->h == r.slot) {
		e->pins++; /* a deduplicated keyed block: reported once, by its writer */
		free(fresh);
	} else {
		e = fresh;
		e->id = r.block;
		e->h = r.slot;
		e->ptr = r.ptr;
		e->pins = 1;
		e->index = index;
		e->tokens = a->geom.block_tokens;
		e->keyed = key != NULL;
		if (key)
			kvs_key_to_bytes(*key, e->key);
		snprintf(e->seq_id, sizeof e->seq_id, "%s", seq_id);
		b->by_slot[slot] = e;
	}
	b->n_pins++;
	pthread_mutex_unlock(&b->mu);
	*h = r.slot;
	return 0;
}

/* Under b->mu: gives back n kvs pins of e, or leaves them to its readers. */
static void drop_pins(agent *a, struct pin_ent *e, uint32_t n)
{
	if (e->readers) {
		e->unpins += n;
		return;
	}
	for (uint32_t i = 0; i < n; i++) {
		int rc = kvs_block_unpin(a->store, e->id);
		if (rc)
			kvm_log(KVM_LOG_ERROR, "unpin_failed", "slot=%u error=\"%s\"",
				kvs_handle_slot(e->h), strerror(-rc));
	}
}

int blocks_release(agent *a, kvs_handle h)
{
	blocks *b = a->blk;
	uint32_t slot = kvs_handle_slot(h);
	if (slot >= a->n_slots)
		return -ENOENT;
	pthread_mutex_lock(&b->mu);
	struct pin_ent *e = b->by_slot[slot];
	int rc = 0;
	if (!e || e->h != h) {
		rc = -ESTALE;
	} else {
		e->pins--;
		b->n_pins--;
		drop_pins(a, e, 1);
		if (e->pins == 0) {
			b->by_slot[slot] = NULL;
			if (e->readers)
				e->gone = true;
			else
				free(e);
		}
	}
	pthread_mutex_unlock(&b->mu);
	return rc;
}

int blocks_read(agent *a, const wire_handle *h, const void **ptr, void **pin)
{
	blocks *b = a->blk;
	if (h->arena != WIRE_ARENA_HOST || h->slot >= a->n_slots)
		return -ENOENT;
	kvs_handle want = (kvs_handle)h->gen << 32 | h->slot;
	pthread_mutex_lock(&b->mu);
	struct pin_ent *e = b->by_slot[h->slot];
	int rc = 0;
	if (!e || e->h != want) {
		/* A slot reused since, or released: the generation tells. */
		rc = kvs_arena_check(a->arena, want) == 0 ? -ENOENT : -ESTALE;
	} else {
		e->readers++;
		*ptr = e->ptr;
		*pin = e;
	}
	pthread_mutex_unlock(&b->mu);
	return rc;
}

void blocks_unread(agent *a, void *pin)
{
	blocks *b = a->blk;
	struct pin_ent *e = pin;
	pthread_mutex_lock(&b->mu);
	if (--e->readers == 0) {
		uint32_t n = e->unpins;
		e->unpins = 0;
		drop_pins(a, e, n);
		if (e->gone)
			free(e);
	}
	pthread_mutex_unlock(&b->mu);
}

/* ---- block reports ------------------------------------------------------------ */

/* Sends one ReportBlocks message from entries (copied under the lock). */
static int send_report(agent *a, struct pin_ent *ents, uint32_t n, bool incremental, bool last,
		       char *msg, size_t msg_len)
{
	Kvmesh__V1__BlockReport *rs = calloc(n ? n : 1, sizeof *rs);
	Kvmesh__V1__BlockReport **rp = calloc(n ? n : 1, sizeof *rp);
	Kvmesh__V1__BlockHandle *hs = calloc(n ? n : 1, sizeof *hs);
	if (!rs || !rp || !hs) {
		free(rs);
		free(rp);
		free(hs);
		snprintf(msg, msg_len, "out of memory");
		return KVM_RPC_RESOURCE_EXHAUSTED;
	}
	for (uint32_t i = 0; i < n; i++) {
		kvmesh__v1__block_report__init(&rs[i]);
		kvmesh__v1__block_handle__init(&hs[i]);
		hs[i].slot = kvs_handle_slot(ents[i].h);
		hs[i].generation = kvs_handle_gen(ents[i].h);
		hs[i].tier = KVMESH__V1__TIER__TIER_HOST;
		rs[i].handle = &hs[i];
		if (ents[i].keyed) {
			rs[i].key.data = ents[i].key;
			rs[i].key.len = 16;
		}
		rs[i].model_id = a->model_id;
		rs[i].refcount = ents[i].pins;
		rs[i].sequence_id = ents[i].seq_id;
		rs[i].index = ents[i].index;
		rs[i].tokens = ents[i].tokens;
		rp[i] = &rs[i];
	}
	Kvmesh__V1__ReportBlocksRequest req = KVMESH__V1__REPORT_BLOCKS_REQUEST__INIT;
	req.node_id = a->node_id;
	req.epoch = agent_epoch(a);
	req.n_blocks = n;
	req.blocks = rp;
	req.last = last;
	req.incremental = incremental;
	void *resp = NULL;
	size_t len;
	int code = agent_coord_call(a, "ReportBlocks", &req.base, &resp, &len, msg, msg_len);
	free(resp);
	free(rs);
	free(rp);
	free(hs);
	if (code == KVM_RPC_UNIMPLEMENTED) {
		/* A coordinator without block reports: GetSequence will not show
		 * handles, but storing and serving blocks works. */
		if (!a->report_unimplemented_logged)
			kvm_log(KVM_LOG_WARN, "report_blocks_unimplemented", "reason=\"%s\"", msg);
		a->report_unimplemented_logged = true;
		return KVM_RPC_OK;
	}
	return code;
}

int blocks_report(agent *a, const kvs_handle *hs, uint32_t n, char *msg, size_t msg_len)
{
	blocks *b = a->blk;
	struct pin_ent *ents = calloc(n ? n : 1, sizeof *ents);
	if (!ents) {
		snprintf(msg, msg_len, "out of memory");
		return KVM_RPC_RESOURCE_EXHAUSTED;
	}
	uint32_t m = 0;
	pthread_mutex_lock(&b->mu);
	for (uint32_t i = 0; i < n; i++) {
		struct pin_ent *e = b->by_slot[kvs_handle_slot(hs[i])];
		if (e && e->h == hs[i])
			ents[m++] = *e;
	}
	pthread_mutex_unlock(&b->mu);
	int code = send_report(a, ents, m, true, true, msg, msg_len);
	free(ents);
	return code;
}

#define REPORT_CHUNK 1024

int blocks_report_all(agent *a)
{
	blocks *b = a->blk;
	struct pin_ent *ents = calloc(REPORT_CHUNK, sizeof *ents);
	if (!ents)
		return -ENOMEM;
	uint32_t slot = 0, sent = 0;
	int code = KVM_RPC_OK;
	char msg[512] = "";
	do {
		uint32_t m = 0;
		pthread_mutex_lock(&b->mu);
		for (; slot < a->n_slots && m < REPORT_CHUNK; slot++)
			if (b->by_slot[slot])
				ents[m++] = *b->by_slot[slot];
		pthread_mutex_unlock(&b->mu);
		code = send_report(a, ents, m, false, slot >= a->n_slots, msg, sizeof msg);
		sent += m;
	} while (code == KVM_RPC_OK && slot < a->n_slots);
	free(ents);
	if (code != KVM_RPC_OK) {
		kvm_log(KVM_LOG_WARN, "block_report_failed", "code=%d reason=\"%s\"", code, msg);
		return -EAGAIN;
	}
	kvm_log(KVM_LOG_INFO, "block_report", "blocks=%u", sent);
	return 0;
}

/* ---- gRPC: PutBlocks, GetBlocks ---------------------------------------------------- */

static void release_all(agent *a, const kvs_handle *hs, size_t n)
{
	for (size_t i = 0; i < n; i++)
		blocks_release(a, hs[i]);
}

int blocks_rpc_put(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	agent *a = arg;
	Kvmesh__V1__PutBlocksRequest *r = kvmesh__v1__put_blocks_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed PutBlocksRequest");
	int rc = KVM_RPC_OK;
	kvs_handle *hs = NULL;
	size_t stored = 0;
	/* Everything is checked before anything is stored. */
	if (strcmp(r->model_id, a->model_id) != 0) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				  "model \"%s\": this agent holds model %s", r->model_id, a->model_id);
		goto out;
	}
	if (!r->sequence_id[0] || strlen(r->sequence_id) >= SEQ_ID_MAX) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				  "sequence_id must be 1..%d bytes", SEQ_ID_MAX - 1);
		goto out;
	}
	if (r->n_blocks == 0 || r->n_blocks > a->n_slots) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "blocks: %zu, must be 1..%u",
				  r->n_blocks, a->n_slots);
		goto out;
	}
	for (size_t i = 0; i < r->n_blocks; i++) {
		const Kvmesh__V1__BlockData *d = r->blocks[i];
		if (d->data.len != a->block_bytes) {
			rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
					  "block %zu (index %zu): %zu bytes, a block of model %s is %zu",
					  i, (size_t)r->first_index + i, d->data.len, a->model_id,
					  a->block_bytes);
			goto out;
		}
		if (d->key.len != 0 && d->key.len != 16) {
			rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
					  "block %zu: key of %zu bytes, must be empty or 16", i,
					  d->key.len);
			goto out;
		}
	}
	if (!(hs = calloc(r->n_blocks, sizeof *hs))) {
		rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	bool retried = false;
	while (stored < r->n_blocks) {
		const Kvmesh__V1__BlockData *d = r->blocks[stored];
		kvs_key k;
		if (d->key.len == 16)
			k = kvs_key_from_bytes(d->key.data);
		int src = blocks_store(a, r->sequence_id, r->first_index + (uint32_t)stored,
				       d->key.len == 16 ? &k : NULL, d->data.data, &hs[stored]);
		if (src == -ENOSPC && !retried) {
			/* Releases may be waiting on the coordinator: fetch them. */
			retried = true;
			agent_heartbeat_now(a);
			continue;
		}
		if (src) {
			release_all(a, hs, stored);
			rc = kvm_rpc_fail(call,
					  src == -ENOSPC ? KVM_RPC_RESOURCE_EXHAUSTED : KVM_RPC_INTERNAL,
					  "block index %zu of sequence %s: %s (stored none of %zu)",
					  (size_t)r->first_index + stored, r->sequence_id,
					  src == -ENOSPC ? "no free slot on this node" : strerror(-src),
					  r->n_blocks);
			stored = 0;
			goto out;
		}
		stored++;
	}
	char msg[512] = "";
	int code = blocks_report(a, hs, (uint32_t)stored, msg, sizeof msg);
	if (code != KVM_RPC_OK) {
		release_all(a, hs, stored);
		rc = kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE,
				  "could not report the blocks to the coordinator (code %d: %s); "
				  "nothing stored",
				  code, msg);
		goto out;
	}
	Kvmesh__V1__BlockHandle *bh = calloc(stored, sizeof *bh);
	Kvmesh__V1__BlockHandle **bp = calloc(stored, sizeof *bp);
	if (!bh || !bp) {
		free(bh);
		free(bp);
		release_all(a, hs, stored);
		rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < stored; i++) {
		kvmesh__v1__block_handle__init(&bh[i]);
		bh[i].slot = kvs_handle_slot(hs[i]);
		bh[i].generation = kvs_handle_gen(hs[i]);
		bh[i].tier = KVMESH__V1__TIER__TIER_HOST;
		bp[i] = &bh[i];
	}
	Kvmesh__V1__PutBlocksResponse resp = KVMESH__V1__PUT_BLOCKS_RESPONSE__INIT;
	resp.n_handles = stored;
	resp.handles = bp;
	size_t n = kvmesh__v1__put_blocks_response__get_packed_size(&resp);
	uint8_t *buf = malloc(n ? n : 1);
	if (buf) {
		kvmesh__v1__put_blocks_response__pack(&resp, buf);
		kvm_rpc_reply(call, buf, n);
	}
	free(buf);
	free(bh);
	free(bp);
	kvm_log(KVM_LOG_DEBUG, "put_blocks", "seq=%s first=%u blocks=%zu", r->sequence_id,
		r->first_index, stored);
out:
	free(hs);
	kvmesh__v1__put_blocks_request__free_unpacked(r, NULL);
	return rc;
}

int blocks_rpc_get(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	agent *a = arg;
	Kvmesh__V1__GetBlocksRequest *r = kvmesh__v1__get_blocks_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed GetBlocksRequest");
	int rc = KVM_RPC_OK;
	size_t n = r->n_handles;
	if (n == 0 || (uint64_t)n * a->block_bytes > KVM_RPC_MAX_MESSAGE - 4096) {
		rc = kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT,
				  "handles: %zu, must be 1..%zu (the reply's size limit)", n,
				  (size_t)(KVM_RPC_MAX_MESSAGE - 4096) / a->block_bytes);
		kvmesh__v1__get_blocks_request__free_unpacked(r, NULL);
		return rc;
	}
	Kvmesh__V1__BlockData *bd = calloc(n, sizeof *bd);
	Kvmesh__V1__BlockData **bp = calloc(n, sizeof *bp);
	void **pins = calloc(n, sizeof *pins);
	uint8_t *keys = calloc(n, 16);
	size_t got = 0;
	if (!bd || !bp || !pins || !keys) {
		rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	for (; got < n; got++) {
		const Kvmesh__V1__BlockHandle *h = r->handles[got];
		if (h->tier != KVMESH__V1__TIER__TIER_HOST &&
		    h->tier != KVMESH__V1__TIER__TIER_UNSPECIFIED) {
			rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND,
					  "handle %zu (slot %u generation %u): tier %d is not held here",
					  got, h->slot, h->generation, h->tier);
			goto out;
		}
		wire_handle wh = {.slot = h->slot, .gen = h->generation, .arena = WIRE_ARENA_HOST};
		const void *ptr;
		int src = blocks_read(a, &wh, &ptr, &pins[got]);
		if (src) {
			rc = kvm_rpc_fail(call, KVM_RPC_NOT_FOUND,
					  "handle %zu (slot %u generation %u): %s", got, h->slot,
					  h->generation,
					  src == -ESTALE ? "stale: the block was released"
							 : "no block held here");
			goto out;
		}
		kvmesh__v1__block_data__init(&bd[got]);
		bd[got].handle = r->handles[got];
		bd[got].data.data = (uint8_t *)ptr;
		bd[got].data.len = a->block_bytes;
		struct pin_ent *e = pins[got];
		if (e->keyed) {
			memcpy(keys + 16 * got, e->key, 16);
			bd[got].key.data = keys + 16 * got;
			bd[got].key.len = 16;
		}
		bp[got] = &bd[got];
	}
	Kvmesh__V1__GetBlocksResponse resp = KVMESH__V1__GET_BLOCKS_RESPONSE__INIT;
	resp.n_blocks = n;
	resp.blocks = bp;
	size_t bytes = kvmesh__v1__get_blocks_response__get_packed_size(&resp);
	uint8_t *buf = malloc(bytes ? bytes : 1);
	if (!buf) {
		rc = kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	kvmesh__v1__get_blocks_response__pack(&resp, buf);
	kvm_rpc_reply(call, buf, bytes);
	free(buf);
out:
	for (size_t i = 0; pins && i < got; i++)
		blocks_unread(a, pins[i]);
	free(bd);
	free(bp);
	free(pins);
	free(keys);
	kvmesh__v1__get_blocks_request__free_unpacked(r, NULL);
	return rc;
}

/* ---- the data server ----------------------------------------------------------------- */

static int dp_get(void *ctx, const wire_block_ref *ref, const void **data, void **pin, uint64_t *csum)
{
	agent *a = ctx;
	(void)csum; /* the store's checksum is of the whole block; let the transport hash */
	if ((uint64_t)ref->offset + ref->len > a->block_bytes)
		return -ERANGE;
	const void *p;
	int rc = blocks_read(a, &ref->h, &p, pin);
	if (rc)
		return rc;
	*data = (const uint8_t *)p + ref->offset;
	return 0;
}

static void dp_unpin(void *ctx, void *pin)
{
	blocks_unread(ctx, pin);
}

/* PUT over the data plane is refused: blocks are immutable and come with
 * their sequence and index through Agent.PutBlocks. */

/* One ATTEND over block handles, run on a kernel worker. */
struct attend_job {
	agent *a;
	const wire_attend_view *v;
	const float *q;
	float *o, *lse;
	int *st;
	xport_attend_token *tok;
};

/* A wire shape for this agent's model, as a kernel shape. */
int agent_shape(agent *a, const wire_shape *w, da_shape *out)
{
	const kvs_geom *g = &a->geom;
	if (w->kv_heads != g->kv_heads || w->head_dim != g->head_dim ||
	    w->block_tokens != g->block_tokens || w->kv_dtype != (uint32_t)g->dtype ||
	    w->layer >= g->layers || w->q_heads == 0 || w->q_heads % w->kv_heads != 0 ||
	    !(w->scale > 0) || !isfinite(w->scale))
		return -EINVAL;
	*out = (da_shape){.q_heads = w->q_heads, .kv_heads = w->kv_heads,
			  .head_dim = w->head_dim, .block_tokens = w->block_tokens,
			  .layer = w->layer, .kv_dtype = g->dtype, .scale = w->scale};
	return da_shape_check(out);
}

static void attend_run(void *arg, da_ctx *ctx)
{
	struct attend_job *j = arg;
	agent *a = j->a;
	const wire_attend_view *v = j->v;
	uint32_t nq = v->n_queries, bt = a->geom.block_tokens;
	da_shape sh;
	int rc = agent_shape(a, &v->shape, &sh);
	const void **ptrs = calloc(v->total_handles ? v->total_handles : 1, sizeof *ptrs);
	void **pins = calloc(v->total_handles ? v->total_handles : 1, sizeof *pins);
	uint32_t *start = calloc(nq + 1, sizeof *start), *ntok = calloc(nq ? nq : 1, sizeof *ntok);
	uint32_t n_pins = 0;
	if (!rc && (!ptrs || !pins || !start || !ntok))
		rc = -ENOMEM;
	const uint8_t *cur = v->queries;
	for (uint32_t i = 0; rc == 0 && i < nq; i++) {
		wire_attend_query wq;
		wire_attend_next(v, &cur, &wq);
		uint32_t first = start[i], nb = wq.n_blocks;
		int qs = 0;
		if (nb ? (wq.n_tokens <= (uint64_t)(nb - 1) * bt || wq.n_tokens > (uint64_t)nb * bt)
		       : wq.n_tokens != 0)
			qs = -EINVAL;
		for (uint32_t k = 0; qs == 0 && k < nb; k++) {
			wire_handle h;
			wire_attend_handle(&wq, k, &h);
			if ((qs = blocks_read(a, &h, &ptrs[first + k], &pins[n_pins])) == 0)
				n_pins++;
			else
				kvm_log(KVM_LOG_DEBUG, "attend_block", "slot=%u gen=%u arena=%u error=\"%s\"",
					h.slot, h.gen, h.arena, strerror(-qs));
		}
		j->st[i] = qs;
		start[i + 1] = qs ? first : first + nb;
		ntok[i] = qs ? 0 : wq.n_tokens;
	}
	if (rc == 0) {
		da_batch b = {.n_queries = nq, .q = j->q, .blocks = (const void *const *)ptrs,
			      .block_start = start, .n_tokens = ntok};
		rc = da_partial_cpu(ctx, &sh, &b, j->o, j->lse);
		size_t row = (size_t)sh.q_heads * sh.head_dim;
		for (uint32_t i = 0; rc == 0 && i < nq; i++)
			if (j->st[i]) { /* failed queries' rows stay zero */
				memset(j->o + i * row, 0, row * sizeof(float));
				memset(j->lse + (size_t)i * sh.q_heads, 0, sh.q_heads * sizeof(float));
			}
	}
	for (uint32_t i = 0; i < n_pins; i++)
		blocks_unread(a, pins[i]);
	free(ptrs);
	free(pins);
	free(start);
	free(ntok);
	xport_attend_complete(j->tok, rc);
	free(j);
}

static int dp_attend(void *ctx, const wire_attend_view *v, const float *q, float *o, float *lse,
		     int *st, xport_attend_token *tok)
{
	agent *a = ctx;
	/* A query naming a sequence makes the batch a home agent's. */
	const uint8_t *cur = v->queries;
	for (uint32_t i = 0; i < v->n_queries; i++) {
		wire_attend_query wq;
		wire_attend_next(v, &cur, &wq);
		wire_handle h;
		if (wq.n_blocks >= 1 && (wire_attend_handle(&wq, 0, &h), h.arena == WIRE_ARENA_SEQUENCE))
			return homeseq_attend_wire(a, v, q, o, lse, st, tok);
	}
	struct attend_job *j = malloc(sizeof *j);
	if (!j)
		return -ENOMEM;
	*j = (struct attend_job){a, v, q, o, lse, st, tok};
	int rc = wpool_submit(a->kernels, attend_run, j);
	if (rc) {
		free(j);
		return rc;
	}
	return XPORT_DEFERRED;
}

static int dp_append(void *ctx, const wire_append_ref *ref, const void *k, const void *v)
{
	agent *a = ctx;
	if (ref->h.arena != WIRE_ARENA_SEQUENCE)
		return -ENOSYS; /* NOTSUP: full blocks are immutable; only sequences grow */
	return homeseq_append_wire(a, ref, k, v);
}

static const xport_handlers dp_handlers = {
	.get = dp_get,
	.unpin = dp_unpin,
	.attend = dp_attend,
	.append = dp_append,
};

/* The RDMA NIC to serve on: --rdma-device if given; else the up RDMA NIC
 * whose interface holds the data address's IP (so that the GID peers reach
 * is the address they dial); else the first up RDMA NIC. NULL: none. */
static const nic_info *rdma_nic(agent *a, const char *host)
{
	const nic_report *r = &a->nics;
	if (a->rdma_device[0]) {
		for (uint32_t i = 0; i < r->n && i < NIC_MAX; i++)
			if (r->nics[i].is_rdma && (strcmp(r->nics[i].rdma_dev, a->rdma_device) == 0 ||
						   strcmp(r->nics[i].name, a->rdma_device) == 0))
				return &r->nics[i];
		return NULL;
	}
	struct in_addr want;
	struct ifaddrs *ifs = NULL;
	if (inet_pton(AF_INET, host, &want) == 1 && want.s_addr != htonl(INADDR_ANY) &&
	    getifaddrs(&ifs) == 0) {
		for (struct ifaddrs *f = ifs; f; f = f->ifa_next) {
			if (!f->ifa_addr || f->ifa_addr->sa_family != AF_INET ||
			    ((struct sockaddr_in *)f->ifa_addr)->sin_addr.s_addr != want.s_addr)
				continue;
			for (uint32_t i = 0; i < r->n && i < NIC_MAX; i++)
				if (r->nics[i].is_rdma && r->nics[i].is_up &&
				    strcmp(r->nics[i].name, f->ifa_name) == 0) {
					freeifaddrs(ifs);
					return &r->nics[i];
				}
		}
		freeifaddrs(ifs);
	}
	for (uint32_t i = 0; i < r->n && i < NIC_MAX; i++)
		if (r->nics[i].is_rdma && r->nics[i].is_up)
			return &r->nics[i];
	return NULL;
}

#define RDMA_CLI_BYTES (64u << 10)

/* Opens the device twice (the server's handle is used on the loop thread,
 * the client's on the home pool) and registers the host arena and the
 * client's small region. Returns 0 or -errno with the reason in msg. */
static int rdma_setup(agent *a, const nic_info *ni, char *msg, size_t msg_len)
{
	/* By interface name when there is one: xrdma_dev_open then takes the
	 * device with a GID on it, as nic_discover matched them. */
	const char *name = ni->rdma_dev[0] ? ni->rdma_dev : ni->name;
	int rc = xrdma_dev_open(name, &a->rdma_srv_dev, msg, msg_len);
	if (rc == 0)
		rc = xrdma_dev_open(name, &a->rdma_cli_dev, msg, msg_len);
	if (rc)
		return rc;
	kvs_arena_info ai;
	kvs_arena_get_info(a->arena, &ai);
	if (ai.kind != KVS_ARENA_HOST || ai.slot_bytes != a->block_bytes) {
		snprintf(msg, msg_len, "the arena is not a host arena of block-sized slots");
		return -EINVAL;
	}
	rc = xrdma_mr_reg(a->rdma_srv_dev, ai.base, (size_t)ai.n_slots * ai.slot_bytes,
			  &a->rdma_srv_mr);
	if (rc) {
		snprintf(msg, msg_len, "registering the host arena (%zu bytes): %s",
			 (size_t)ai.n_slots * ai.slot_bytes, xrdma_dev_error(a->rdma_srv_dev));
		return rc;
	}
	if (posix_memalign(&a->rdma_cli_buf, 4096, RDMA_CLI_BYTES) != 0) {
		a->rdma_cli_buf = NULL;
		snprintf(msg, msg_len, "out of memory");
		return -ENOMEM;
	}
	memset(a->rdma_cli_buf, 0, RDMA_CLI_BYTES);
	rc = xrdma_mr_reg(a->rdma_cli_dev, a->rdma_cli_buf, RDMA_CLI_BYTES, &a->rdma_cli_mr);
	if (rc)
		snprintf(msg, msg_len, "registering the client region: %s",
			 xrdma_dev_error(a->rdma_cli_dev));
	return rc;
}

void dataplane_rdma_free(agent *a)
{
	xrdma_mr_dereg(a->rdma_cli_mr);
	xrdma_mr_dereg(a->rdma_srv_mr);
	xrdma_dev_close(a->rdma_cli_dev);
	xrdma_dev_close(a->rdma_srv_dev);
	free(a->rdma_cli_buf);
	a->rdma_cli_mr = a->rdma_srv_mr = NULL;
	a->rdma_cli_dev = a->rdma_srv_dev = NULL;
	a->rdma_cli_buf = NULL;
	a->data_rdma = false;
}

int dataplane_start(agent *a)
{
	char host[256];
	uint16_t port;
	int rc = kvm_parse_addr(a->data_address, host, sizeof host, &port);
	if (rc) {
		kvm_log(KVM_LOG_ERROR, "data_address", "addr=%s error=\"not host:port\"",
			a->data_address);
		return rc;
	}
	bool want = strcmp(a->rdma_opt, "off") != 0, must = strcmp(a->rdma_opt, "on") == 0;
	if (strcmp(a->rdma_opt, "auto") != 0 && want && !must) {
		kvm_log(KVM_LOG_ERROR, "rdma_option", "rdma=%s error=\"not auto, on or off\"",
			a->rdma_opt);
		return -EINVAL;
	}
	if (want && nic_discover(&a->nics) != 0)
		memset(&a->nics, 0, sizeof a->nics);
	const nic_info *ni = want ? rdma_nic(a, host) : NULL;
	if (want && ni) {
		char msg[512] = "";
		rc = rdma_setup(a, ni, msg, sizeof msg);
		if (rc) {
			kvm_log(must ? KVM_LOG_ERROR : KVM_LOG_WARN, "rdma_unavailable",
				"device=%s netdev=%s error=\"%s\"%s", ni->rdma_dev, ni->name,
				msg[0] ? msg : strerror(-rc), must ? "" : " fallback=tcp");
			dataplane_rdma_free(a);
			if (must)
				return rc;
		} else {
			a->data_rdma = true;
		}
	} else if (must) {
		kvm_log(KVM_LOG_ERROR, "rdma_unavailable", "error=\"%s\"",
			a->rdma_device[0] ? "no RDMA NIC by the name of --rdma-device"
					  : "no up RDMA port on this node (--rdma=on)");
		return -ENODEV;
	}
	if ((rc = xport_loop_create(&a->loop)) != 0) {
		dataplane_rdma_free(a);
		return rc;
	}
	xport_opts o;
	xport_opts_default(&o);
	o.node_id = agent_data_id(a->node_id);
	o.auth_token = a->token;
	if (a->data_rdma) {
		xport_rdma_cfg cfg = {.dev = a->rdma_srv_dev,
				      .mr = a->rdma_srv_mr,
				      .slot_bytes = a->block_bytes,
				      .arena = WIRE_ARENA_HOST};
		rc = xport_rdma_listen(a->loop, host, port, &o, &cfg, &dp_handlers, a, &a->data_srv);
	} else {
		rc = xport_listen(&xport_tcp_ops, a->loop, host, port, &o, &dp_handlers, a,
				  &a->data_srv);
	}
	if (rc) {
		kvm_log(KVM_LOG_ERROR, "data_listen_failed", "addr=%s transport=%s error=\"%s\"",
			a->data_address, a->data_rdma ? "rdma" : "tcp", strerror(-rc));
		xport_loop_destroy(a->loop);
		a->loop = NULL;
		dataplane_rdma_free(a);
		return rc;
	}
	if (a->data_rdma)
		kvm_log(KVM_LOG_INFO, "data_server", "addr=%s transport=rdma device=%s netdev=%s "
			"gid_index=%d arena_bytes=%zu",
			a->data_address, xrdma_dev_name(a->rdma_srv_dev), ni->name,
			xrdma_dev_gid_index(a->rdma_srv_dev), xrdma_mr_len(a->rdma_srv_mr));
	else
		kvm_log(KVM_LOG_INFO, "data_server", "addr=%s transport=tcp device=none rdma=%s",
			a->data_address, a->rdma_opt);
	return 0;
}

void dataplane_stop(agent *a)
{
	if (a->data_srv)
		xport_server_close(a->data_srv);
	a->data_srv = NULL;
}

/* ---- MoveBlocks (a drain) ---------------------------------------------------------- */

struct move_job {
	agent *a;
	size_t n;
	struct move_one {
		wire_handle h;
		char seq[SEQ_ID_MAX];
		uint32_t index;
		bool keyed;
		uint8_t key[16];
		char target[256], addr[256];
	} *m;
};

/* At most this many bytes of blocks in one PutBlocks of a drain (as the
 * client's writes; the gRPC limit is KVM_RPC_MAX_MESSAGE). */
#define MOVE_BATCH_BYTES (16u << 20)

/* Whether move b continues the run that move a ends: same target and
 * sequence, next index (one PutBlocks carries first_index + n blocks). */
static bool move_follows(const struct move_one *a, const struct move_one *b)
{
	return b->index == a->index + 1 && strcmp(a->addr, b->addr) == 0 && strcmp(a->seq, b->seq) == 0;
}

/* Copies moves m[0..n) (one run: same target and sequence, consecutive
 * indexes) to their target with one PutBlocks. A block that cannot be read
 * here is left out, splitting the run. Returns the blocks moved (failures
 * logged; the coordinator plans the rest again). */
static size_t move_run_put(agent *a, struct move_one *m, size_t n, kvm_rpc_channel *ch)
{
	Kvmesh__V1__BlockData *bd = calloc(n, sizeof *bd);
	Kvmesh__V1__BlockData **bdp = calloc(n, sizeof *bdp);
	void **pins = calloc(n, sizeof *pins);
	size_t got = 0, moved = 0;
	if (!bd || !bdp || !pins) {
		kvm_log(KVM_LOG_WARN, "move_failed", "sequence=%s index=%u to=%s error=\"out of memory\"",
			m[0].seq, m[0].index, m[0].target);
		goto out;
	}
	for (size_t k = 0; k <= n; k++) {
		const void *ptr = NULL;
		int rc = k < n ? blocks_read(a, &m[k].h, &ptr, &pins[got]) : -ENOENT;
		if (rc && k < n)
			kvm_log(KVM_LOG_WARN, "move_failed", "sequence=%s index=%u to=%s error=\"%s\"", m[k].seq,
				m[k].index, m[k].target, rc == -ESTALE ? "released meanwhile" : "not held here");
		if (rc == 0) {
			kvmesh__v1__block_data__init(&bd[got]);
			bd[got].data.data = (uint8_t *)ptr;
			bd[got].data.len = a->block_bytes;
			if (m[k].keyed) {
				bd[got].key.data = m[k].key;
				bd[got].key.len = 16;
			}
			bdp[got] = &bd[got];
			got++;
			continue;
		}
		if (!got)
			continue;
		/* The blocks read so far are m[k - got .. k): send them. */
		const struct move_one *f = &m[k - got];
		Kvmesh__V1__PutBlocksRequest req = KVMESH__V1__PUT_BLOCKS_REQUEST__INIT;
		req.model_id = a->model_id;
		req.sequence_id = (char *)f->seq;
		req.first_index = f->index;
		req.n_blocks = got;
		req.blocks = bdp;
		void *resp = NULL;
		size_t len;
		char msg[512];
		int code = agent_peer_call(a, ch, "PutBlocks", &req.base, &resp, &len, msg, sizeof msg);
		for (size_t i = 0; i < got; i++)
			blocks_unread(a, pins[i]);
		free(resp);
		if (code != KVM_RPC_OK)
			kvm_log(KVM_LOG_WARN, "move_failed", "sequence=%s index=%u blocks=%zu to=%s error=\"%s\"",
				f->seq, f->index, got, f->target, msg);
		else
			moved += got;
		got = 0;
	}
out:
	free(bd);
	free(bdp);
	free(pins);
	return moved;
}

static void move_run(void *arg, da_ctx *ctx)
{
	(void)ctx;
	struct move_job *j = arg;
	size_t moved = 0, calls = 0;
	size_t per_call = MOVE_BATCH_BYTES / j->a->block_bytes ? MOVE_BATCH_BYTES / j->a->block_bytes : 1;
	struct move_one *run = calloc(per_call, sizeof *run);
	/* One channel per target, in the order the moves name them; runs of
	 * one sequence's consecutive blocks go in one PutBlocks, so that the
	 * target stores and reports them at once (one durable update at the
	 * coordinator instead of one per block). */
	for (size_t i = 0; run && i < j->n; i++) {
		if (!j->m[i].addr[0])
			continue;
		kvm_rpc_channel *ch = NULL;
		if (kvm_rpc_channel_open(j->m[i].addr, &ch) != 0) {
			kvm_log(KVM_LOG_WARN, "move_failed", "to=%s error=\"bad address %s\"", j->m[i].target,
				j->m[i].addr);
			continue;
		}
		char addr[256];
		snprintf(addr, sizeof addr, "%s", j->m[i].addr);
		size_t n = 0;
		for (size_t k = i; k < j->n; k++) {
			if (strcmp(j->m[k].addr, addr) != 0)
				continue;
			if (n && (n == per_call || !move_follows(&run[n - 1], &j->m[k]))) {
				moved += move_run_put(j->a, run, n, ch);
				calls++;
				n = 0;
			}
			run[n++] = j->m[k];
			j->m[k].addr[0] = '\0';
		}
		if (n) {
			moved += move_run_put(j->a, run, n, ch);
			calls++;
		}
		kvm_rpc_channel_close(ch);
	}
	if (!run)
		kvm_log(KVM_LOG_WARN, "move_failed", "blocks=%zu error=\"out of memory\"", j->n);
	kvm_log(KVM_LOG_INFO, "blocks_moved", "blocks=%zu of=%zu calls=%zu", moved, j->n, calls);
	free(run);
	free(j->m);
	free(j);
}

int blocks_move(agent *a, const Kvmesh__V1__Command__MoveBlocks *m)
{
	struct move_job *j = calloc(1, sizeof *j);
	if (j)
		j->m = calloc(m->n_moves + 1, sizeof *j->m);
	if (!j || !j->m) {
		free(j);
		return -ENOMEM;
	}
	j->a = a;
	for (size_t i = 0; i < m->n_moves; i++) {
		const Kvmesh__V1__Command__MoveBlocks__Move *mv = m->moves[i];
		struct move_one *o = &j->m[j->n];
		if (!mv->handle || !mv->sequence_id[0] || strlen(mv->sequence_id) >= SEQ_ID_MAX ||
		    !mv->target_address[0] || (mv->key.len != 0 && mv->key.len != 16))
			continue; /* the coordinator gives up on it and plans again */
		o->h = (wire_handle){.slot = mv->handle->slot, .gen = mv->handle->generation,
				     .arena = WIRE_ARENA_HOST};
		snprintf(o->seq, sizeof o->seq, "%s", mv->sequence_id);
		o->index = mv->index;
		o->keyed = mv->key.len == 16;
		if (o->keyed)
			memcpy(o->key, mv->key.data, 16);
		snprintf(o->target, sizeof o->target, "%s", mv->target_node);
		snprintf(o->addr, sizeof o->addr, "%s", mv->target_address);
		j->n++;
	}
	int rc = wpool_submit(a->movers, move_run, j);
	if (rc) {
		free(j->m);
		free(j);
	}
	return rc;
}
