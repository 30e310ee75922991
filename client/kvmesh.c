/* libkvmesh: see kvmesh.h. Control calls are gRPC (common/rpc.h) with
 * protobuf-c messages; decode steps and block reads use the data plane
 * (transport/transport.h) to the agents. */
#include "client/kvmesh.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <xxhash.h>

#include "common/addr.h"
#include "common/auth.h"
#include "common/log.h"
#include "common/rpc.h"
#include "kvstore/key.h"
#include "proto/kvmesh.pb-c.h"
#include "transport/transport.h"

#define ID_MAX 64

/* What the client remembers of a sequence it works on: where its home agent
 * listens, its data-plane name, and the next token position of each layer
 * (the client is the sequence's only writer). */
typedef struct seq_state {
	char id[ID_MAX];
	char model[ID_MAX];
	char home[ID_MAX];
	char home_data[128];
	uint64_t data_id;
	uint32_t layers;
	uint32_t *pos; /* [layers] */
	struct seq_state *next;
} seq_state;

/* An agent's gRPC channel (PutBlocks). */
typedef struct agent_ch {
	char node[ID_MAX];
	char grpc[128];
	char data[128];
	kvm_rpc_channel *ch;
	struct agent_ch *next;
} agent_ch;

/* A data-plane connection, by data address. */
typedef struct data_peer {
	char addr[128];
	xport_peer *peer;
	struct data_peer *next;
} data_peer;

typedef struct model_ent {
	kvm_model m;
	struct model_ent *next;
} model_ent;

#define SEQ_BUCKETS 1024

struct kvm_client {
	kvm_client_opts opts; /* auth_token points at token, auth_token_file is NULL */
	char token[KVM_AUTH_TOKEN_MAX + 1];
	kvm_rpc_channel *coord;
	xport_loop *loop;
	pthread_key_t err_key;
	pthread_mutex_t mu; /* the tables below */
	seq_state *seqs[SEQ_BUCKETS];
	agent_ch *agents;
	data_peer *peers;
	model_ent *models;
	_Atomic uint64_t bytes_out, bytes_in, attend_queries, blocks_written, blocks_written_bytes;
};

/* ---- errors ---------------------------------------------------------------- */

#define ERR_MAX 1024

static char *err_buf(kvm_client *c)
{
	char *b = pthread_getspecific(c->err_key);
	if (!b) {
		b = calloc(1, ERR_MAX);
		if (b)
			pthread_setspecific(c->err_key, b);
	}
	return b;
}

__attribute__((format(printf, 3, 4))) static int fail(kvm_client *c, int rc, const char *fmt, ...)
{
	char *b = err_buf(c);
	if (b) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(b, ERR_MAX, fmt, ap);
		va_end(ap);
	}
	return rc;
}

static void clear_err(kvm_client *c)
{
	char *b = err_buf(c);
	if (b)
		b[0] = '\0';
}

const char *kvm_client_error(kvm_client *c)
{
	char *b = err_buf(c);
	return b ? b : "out of memory";
}

static int errno_of_status(int code)
{
	switch (code) {
	case KVM_RPC_OK: return 0;
	case KVM_RPC_INVALID_ARGUMENT: return -EINVAL;
	case KVM_RPC_NOT_FOUND: return -ENOENT;
	case KVM_RPC_ALREADY_EXISTS: return -EEXIST;
	case KVM_RPC_RESOURCE_EXHAUSTED: return -ENOSPC;
	case KVM_RPC_FAILED_PRECONDITION: return -EBUSY;
	case KVM_RPC_DEADLINE_EXCEEDED: return -ETIMEDOUT;
	case KVM_RPC_UNAVAILABLE: return -EHOSTUNREACH;
	case KVM_RPC_UNAUTHENTICATED:
	case KVM_RPC_PERMISSION_DENIED: return -EACCES;
	default: return -EIO;
	}
}

/* ---- gRPC calls -------------------------------------------------------------- */

/* Packs req, calls service/method on ch, unpacks the reply with `desc`.
 * On failure the thread's error says what and where. */
static int call(kvm_client *c, kvm_rpc_channel *ch, const char *where, const char *method,
		const ProtobufCMessage *req, const ProtobufCMessageDescriptor *desc, ProtobufCMessage **resp)
{
	size_t n = protobuf_c_message_get_packed_size(req);
	uint8_t *buf = malloc(n ? n : 1);
	if (!buf)
		return fail(c, -ENOMEM, "out of memory");
	protobuf_c_message_pack(req, buf);
	void *out = NULL;
	size_t out_len = 0;
	kvm_rpc_status st;
	int rc = kvm_rpc_unary(ch, method, buf, n, c->opts.control_timeout_ms, &out, &out_len, &st);
	free(buf);
	if (rc != 0)
		return fail(c, rc, "%s %s: %s", where, method, kvm_strerror(rc));
	if (st.code != KVM_RPC_OK)
		return fail(c, errno_of_status(st.code), "%s: %s", where, st.message);
	*resp = protobuf_c_message_unpack(desc, NULL, out_len, out);
	free(out);
	if (!*resp)
		return fail(c, -EPROTO, "%s %s: malformed reply", where, method);
	return 0;
}

#define COORD(c, m, req, T, resp)                                                                \
	call(c, (c)->coord, "coordinator", "/kvmesh.v1.Coordinator/" m, &(req)->base, &T##__descriptor, \
	     (ProtobufCMessage **)(resp))

/* ---- client ------------------------------------------------------------------ */

static void free_err(void *p)
{
	free(p);
}

int kvm_client_open(const char *coordinator, const kvm_client_opts *opts, kvm_client **out)
{
	if (!coordinator || !*coordinator || !out)
		return -EINVAL;
	kvm_client *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->opts.control_timeout_ms = opts && opts->control_timeout_ms > 0 ? opts->control_timeout_ms : 5000;
	c->opts.data_timeout_ms = opts && opts->data_timeout_ms > 0 ? opts->data_timeout_ms : 5000;
	int rc;
	if (opts && opts->auth_token && *opts->auth_token) {
		rc = strlen(opts->auth_token) > KVM_AUTH_TOKEN_MAX ? -E2BIG : 0;
		if (!rc)
			snprintf(c->token, sizeof(c->token), "%s", opts->auth_token);
	} else if (opts && opts->auth_token_file && *opts->auth_token_file) {
		char err[1024];
		rc = kvm_auth_load_token(opts->auth_token_file, c->token, sizeof(c->token), err,
					 sizeof(err));
		if (rc)
			kvm_log(KVM_LOG_ERROR, "auth_token_failed", "error=\"%s\"", err);
	} else {
		rc = 0;
	}
	if (rc) {
		free(c);
		return rc;
	}
	c->opts.auth_token = c->token;
	if ((rc = pthread_key_create(&c->err_key, free_err)) != 0) {
		free(c);
		return -rc;
	}
	pthread_mutex_init(&c->mu, NULL);
	if ((rc = kvm_rpc_channel_open(coordinator, &c->coord)) != 0)
		goto fail_key;
	if ((rc = kvm_rpc_channel_set_token(c->coord, c->token)) != 0)
		goto fail_channel;
	if ((rc = xport_loop_create(&c->loop)) != 0)
		goto fail_channel;
	*out = c;
	return 0;
fail_channel:
	kvm_rpc_channel_close(c->coord);
fail_key:
	pthread_key_delete(c->err_key);
	pthread_mutex_destroy(&c->mu);
	free(c);
	return rc;
}

void kvm_client_close(kvm_client *c)
{
	if (!c)
		return;
	for (data_peer *p = c->peers, *n; p; p = n) {
		n = p->next;
		xport_close(p->peer);
		free(p);
	}
	xport_loop_destroy(c->loop);
	for (agent_ch *a = c->agents, *n; a; a = n) {
		n = a->next;
		kvm_rpc_channel_close(a->ch);
		free(a);
	}
	for (int i = 0; i < SEQ_BUCKETS; i++)
		for (seq_state *s = c->seqs[i], *n; s; s = n) {
			n = s->next;
			free(s->pos);
			free(s);
		}
	for (model_ent *m = c->models, *n; m; m = n) {
		n = m->next;
		free(m);
	}
	kvm_rpc_channel_close(c->coord);
	/* This thread's message buffer: the key's destructor only runs at
	 * thread exit, and the key goes away now. */
	free(pthread_getspecific(c->err_key));
	pthread_key_delete(c->err_key);
	pthread_mutex_destroy(&c->mu);
	memset(c->token, 0, sizeof(c->token));
	free(c);
}

void kvm_client_get_stats(kvm_client *c, kvm_client_stats *o)
{
	o->data_bytes_out = c->bytes_out;
	o->data_bytes_in = c->bytes_in;
	o->attend_queries = c->attend_queries;
	o->blocks_written = c->blocks_written;
	o->blocks_written_bytes = c->blocks_written_bytes;
}

/* ---- models -------------------------------------------------------------------- */

static size_t dtype_bytes(kvm_dtype t)
{
	return t == KVM_F32 ? 4 : t == KVM_F16 || t == KVM_BF16 ? 2 : 0;
}

size_t kvm_row_bytes(const kvm_model *m)
{
	return (size_t)m->kv_heads * m->head_dim * dtype_bytes(m->dtype);
}

size_t kvm_block_bytes(const kvm_model *m)
{
	return (size_t)m->layers * 2 * m->block_tokens * kvm_row_bytes(m);
}

static void model_from_proto(const Kvmesh__V1__Model *p, kvm_model *m)
{
	memset(m, 0, sizeof(*m));
	snprintf(m->id, sizeof(m->id), "%s", p->id);
	m->q_heads = p->q_heads;
	if (p->geometry) {
		m->layers = p->geometry->layers;
		m->kv_heads = p->geometry->kv_heads;
		m->head_dim = p->geometry->head_dim;
		m->block_tokens = p->geometry->block_tokens;
		m->dtype = (kvm_dtype)p->geometry->dtype;
	}
}

int kvm_model_register(kvm_client *c, const kvm_model *m)
{
	clear_err(c);
	if (!m || !m->id[0] || !dtype_bytes(m->dtype))
		return fail(c, -EINVAL, "model: id and a dtype (KVM_F32, KVM_F16, KVM_BF16) are required");
	Kvmesh__V1__BlockGeometry g = KVMESH__V1__BLOCK_GEOMETRY__INIT;
	g.layers = m->layers;
	g.kv_heads = m->kv_heads;
	g.head_dim = m->head_dim;
	g.block_tokens = m->block_tokens;
	g.dtype = (Kvmesh__V1__KvDtype)m->dtype;
	Kvmesh__V1__Model req = KVMESH__V1__MODEL__INIT;
	req.id = (char *)m->id;
	req.geometry = &g;
	req.q_heads = m->q_heads;
	Kvmesh__V1__Model *r = NULL;
	int rc = COORD(c, "RegisterModel", &req, kvmesh__v1__model, &r);
	if (rc == -EEXIST) {
		/* Already there: fine if it is the same model. */
		kvm_model have;
		if (kvm_model_get(c, m->id, &have) == 0 && have.layers == m->layers &&
		    have.q_heads == m->q_heads && have.kv_heads == m->kv_heads &&
		    have.head_dim == m->head_dim && have.block_tokens == m->block_tokens &&
		    have.dtype == m->dtype) {
			clear_err(c);
			return 0;
		}
		return fail(c, -EEXIST, "model %s is registered with a different shape", m->id);
	}
	if (rc == 0)
		kvmesh__v1__model__free_unpacked(r, NULL);
	return rc;
}

int kvm_model_get(kvm_client *c, const char *id, kvm_model *out)
{
	pthread_mutex_lock(&c->mu);
	for (model_ent *e = c->models; e; e = e->next)
		if (strcmp(e->m.id, id) == 0) {
			*out = e->m;
			pthread_mutex_unlock(&c->mu);
			return 0;
		}
	pthread_mutex_unlock(&c->mu);
	Kvmesh__V1__ListModelsRequest req = KVMESH__V1__LIST_MODELS_REQUEST__INIT;
	Kvmesh__V1__ListModelsResponse *r = NULL;
	int rc = COORD(c, "ListModels", &req, kvmesh__v1__list_models_response, &r);
	if (rc)
		return rc;
	rc = fail(c, -ENOENT, "model %s is not registered", id);
	for (size_t i = 0; i < r->n_models; i++) {
		if (strcmp(r->models[i]->id, id) != 0)
			continue;
		model_ent *e = calloc(1, sizeof(*e));
		if (!e) {
			rc = -ENOMEM;
			break;
		}
		model_from_proto(r->models[i], &e->m);
		*out = e->m;
		pthread_mutex_lock(&c->mu);
		e->next = c->models;
		c->models = e;
		pthread_mutex_unlock(&c->mu);
		clear_err(c);
		rc = 0;
		break;
	}
	kvmesh__v1__list_models_response__free_unpacked(r, NULL);
	return rc;
}

/* ---- nodes: gRPC channels and data-plane peers --------------------------------- */

/* Refreshes the node table from ListNodes (mu not held). */
static int refresh_nodes(kvm_client *c)
{
	Kvmesh__V1__ListNodesRequest req = KVMESH__V1__LIST_NODES_REQUEST__INIT;
	Kvmesh__V1__ListNodesResponse *r = NULL;
	int rc = COORD(c, "ListNodes", &req, kvmesh__v1__list_nodes_response, &r);
	if (rc)
		return rc;
	pthread_mutex_lock(&c->mu);
	for (size_t i = 0; i < r->n_nodes; i++) {
		const Kvmesh__V1__Node *n = r->nodes[i];
		agent_ch *a;
		for (a = c->agents; a && strcmp(a->node, n->id) != 0; a = a->next)
			;
		if (a && strcmp(a->grpc, n->grpc_address) != 0) {
			/* The node came back elsewhere: a new channel. */
			kvm_rpc_channel_close(a->ch);
			a->ch = NULL;
		}
		if (!a) {
			if (!(a = calloc(1, sizeof(*a))))
				continue;
			snprintf(a->node, sizeof(a->node), "%s", n->id);
			a->next = c->agents;
			c->agents = a;
		}
		snprintf(a->grpc, sizeof(a->grpc), "%s", n->grpc_address);
		snprintf(a->data, sizeof(a->data), "%s", n->data_address);
		if (!a->ch && kvm_rpc_channel_open(a->grpc, &a->ch) != 0)
			a->ch = NULL;
		if (a->ch)
			kvm_rpc_channel_set_token(a->ch, c->token); /* fits: checked at open */
	}
	pthread_mutex_unlock(&c->mu);
	kvmesh__v1__list_nodes_response__free_unpacked(r, NULL);
	return 0;
}

/* The gRPC channel and data address of a node (looked up once). */
static int node_lookup(kvm_client *c, const char *node, kvm_rpc_channel **ch, char *data, size_t cap)
{
	for (int attempt = 0; attempt < 2; attempt++) {
		pthread_mutex_lock(&c->mu);
		for (agent_ch *a = c->agents; a; a = a->next)
			if (strcmp(a->node, node) == 0 && a->ch) {
				if (ch)
					*ch = a->ch;
				if (data)
					snprintf(data, cap, "%s", a->data);
				pthread_mutex_unlock(&c->mu);
				return 0;
			}
		pthread_mutex_unlock(&c->mu);
		if (attempt == 0) {
			int rc = refresh_nodes(c);
			if (rc)
				return rc;
		}
	}
	return fail(c, -ENOENT, "node %s is not registered", node);
}

/* A live data-plane connection to addr; connects on first use. The peer
 * stays the client's. */
static int data_peer_get(kvm_client *c, const char *addr, xport_peer **out)
{
	pthread_mutex_lock(&c->mu);
	for (data_peer *p = c->peers; p; p = p->next)
		if (strcmp(p->addr, addr) == 0) {
			*out = p->peer;
			pthread_mutex_unlock(&c->mu);
			return 0;
		}
	char host[128];
	uint16_t port;
	int rc = kvm_parse_addr(addr, host, sizeof(host), &port) == 0 && port ? 0 : -EINVAL;
	if (rc) {
		pthread_mutex_unlock(&c->mu);
		return fail(c, rc, "bad data-plane address \"%s\"", addr);
	}
	xport_opts o;
	xport_opts_default(&o);
	o.n_conns = 1;
	o.auth_token = c->token;
	data_peer *p = calloc(1, sizeof(*p));
	if (!p) {
		pthread_mutex_unlock(&c->mu);
		return -ENOMEM;
	}
	/* Connecting under the lock keeps one connection per address; it only
	 * happens once per agent. */
	rc = xport_connect(&xport_tcp_ops, c->loop, host, port, &o, &p->peer);
	if (rc) {
		pthread_mutex_unlock(&c->mu);
		free(p);
		if (rc == -EACCES)
			return fail(c, rc, "the data plane at %s refused us: missing or wrong "
				    "authorization token (kvm_client_opts.auth_token)", addr);
		return fail(c, rc, "cannot reach the data plane at %s: %s", addr, kvm_strerror(rc));
	}
	snprintf(p->addr, sizeof(p->addr), "%s", addr);
	p->next = c->peers;
	c->peers = p;
	*out = p->peer;
	pthread_mutex_unlock(&c->mu);
	return 0;
}

/* Drops a connection that failed, so that the next call dials again. */
static void data_peer_drop(kvm_client *c, const char *addr)
{
	pthread_mutex_lock(&c->mu);
	for (data_peer **pp = &c->peers; *pp; pp = &(*pp)->next)
		if (strcmp((*pp)->addr, addr) == 0) {
			data_peer *p = *pp;
			*pp = p->next;
			pthread_mutex_unlock(&c->mu);
			xport_close(p->peer);
			free(p);
			return;
		}
	pthread_mutex_unlock(&c->mu);
}

/* Finishes a one-request wait: submit_rc is what the request function
 * returned (its callback does not run when it refused), then waits for the
 * request and frees the waiter. */
static int waiter_finish(xport_waiter *w, int submit_rc)
{
	if (submit_rc)
		xport_waiter_cb(w, submit_rc);
	int rc = xport_waiter_wait(w);
	xport_waiter_destroy(w);
	return rc;
}

static void waiter_start(xport_waiter *w)
{
	xport_waiter_init(w);
	xport_waiter_add(w, 1);
}

/* ---- sequences ------------------------------------------------------------------- */

static uint64_t data_id_of(const char *id)
{
	return XXH3_64bits(id, strlen(id));
}

static void info_from_proto(const Kvmesh__V1__Sequence *s, kvm_seq_info *i)
{
	memset(i, 0, sizeof(*i));
	snprintf(i->id, sizeof(i->id), "%s", s->id);
	snprintf(i->model_id, sizeof(i->model_id), "%s", s->model_id);
	snprintf(i->home, sizeof(i->home), "%s", s->home_node);
	i->tokens = s->tokens;
	i->blocks = (uint32_t)(s->n_blocks ? s->n_blocks : s->block_count);
	for (size_t b = 0; b < s->n_blocks; b++) {
		i->borrowed_blocks += s->blocks[b]->borrowed;
		i->written_blocks += s->blocks[b]->handle != NULL;
	}
	i->shared_prefix_blocks = s->shared_prefix_blocks;
	i->degraded = s->degraded;
}

/* The client's record of a sequence (mu held); NULL if none. */
static seq_state *seq_find(kvm_client *c, const char *id)
{
	for (seq_state *s = c->seqs[data_id_of(id) % SEQ_BUCKETS]; s; s = s->next)
		if (strcmp(s->id, id) == 0)
			return s;
	return NULL;
}

/* Learns (or refreshes) a sequence from the coordinator's view. */
static int seq_learn(kvm_client *c, const Kvmesh__V1__Sequence *p)
{
	kvm_model m;
	int rc = kvm_model_get(c, p->model_id, &m);
	if (rc)
		return rc;
	char data[128];
	if ((rc = node_lookup(c, p->home_node, NULL, data, sizeof(data))) != 0)
		return rc;
	pthread_mutex_lock(&c->mu);
	seq_state *s = seq_find(c, p->id);
	if (!s) {
		s = calloc(1, sizeof(*s));
		uint32_t *pos = calloc(m.layers ? m.layers : 1, sizeof(uint32_t));
		if (!s || !pos) {
			pthread_mutex_unlock(&c->mu);
			free(s);
			free(pos);
			return -ENOMEM;
		}
		snprintf(s->id, sizeof(s->id), "%s", p->id);
		snprintf(s->model, sizeof(s->model), "%s", p->model_id);
		s->data_id = data_id_of(p->id);
		s->layers = m.layers;
		s->pos = pos;
		/* A sequence created with a shared prefix starts after it. */
		for (uint32_t l = 0; l < m.layers; l++)
			pos[l] = p->shared_prefix_blocks * m.block_tokens;
		uint64_t b = s->data_id % SEQ_BUCKETS;
		s->next = c->seqs[b];
		c->seqs[b] = s;
	}
	snprintf(s->home, sizeof(s->home), "%s", p->home_node);
	snprintf(s->home_data, sizeof(s->home_data), "%s", data);
	pthread_mutex_unlock(&c->mu);
	return 0;
}

static int get_seq_proto(kvm_client *c, const char *id, Kvmesh__V1__Sequence **out)
{
	Kvmesh__V1__GetSequenceRequest req = KVMESH__V1__GET_SEQUENCE_REQUEST__INIT;
	req.sequence_id = (char *)id;
	return COORD(c, "GetSequence", &req, kvmesh__v1__sequence, out);
}

int kvm_seq_create(kvm_client *c, const char *model_id, const char *seq_id, const uint32_t *prompt,
		   uint32_t n_prompt, const char *home, kvm_seq_info *info)
{
	clear_err(c);
	if (!model_id || (n_prompt && !prompt))
		return fail(c, -EINVAL, "create: model id required; prompt must not be NULL when n_prompt > 0");
	Kvmesh__V1__CreateSequenceRequest req = KVMESH__V1__CREATE_SEQUENCE_REQUEST__INIT;
	req.model_id = (char *)model_id;
	req.sequence_id = (char *)(seq_id ? seq_id : "");
	req.prompt_tokens = (uint32_t *)prompt;
	req.n_prompt_tokens = n_prompt;
	req.home_node = (char *)(home ? home : "");
	Kvmesh__V1__Sequence *s = NULL;
	int rc = COORD(c, "CreateSequence", &req, kvmesh__v1__sequence, &s);
	if (rc)
		return rc;
	rc = seq_learn(c, s);
	if (info)
		info_from_proto(s, info);
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return rc;
}

int kvm_seq_get(kvm_client *c, const char *seq_id, kvm_seq_info *info)
{
	clear_err(c);
	Kvmesh__V1__Sequence *s = NULL;
	int rc = get_seq_proto(c, seq_id, &s);
	if (rc)
		return rc;
	if (info)
		info_from_proto(s, info);
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return 0;
}

int kvm_seq_blocks(kvm_client *c, const char *seq_id, kvm_block_info *out, uint32_t cap, uint32_t *total)
{
	clear_err(c);
	if (!seq_id || (cap && !out) || !total)
		return fail(c, -EINVAL, "seq_blocks: bad arguments");
	Kvmesh__V1__Sequence *s = NULL;
	int rc = get_seq_proto(c, seq_id, &s);
	if (rc)
		return rc;
	*total = (uint32_t)s->n_blocks;
	for (size_t i = 0; i < s->n_blocks && i < cap; i++) {
		const Kvmesh__V1__BlockPlacement *p = s->blocks[i];
		kvm_block_info *b = &out[i];
		memset(b, 0, sizeof(*b));
		b->index = p->index;
		snprintf(b->node, sizeof(b->node), "%s", p->node_id);
		b->borrowed = p->borrowed;
		b->written = p->handle != NULL;
		if (p->handle)
			b->slot = p->handle->slot, b->generation = p->handle->generation;
		b->tokens = p->tokens;
	}
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return 0;
}

int kvm_seq_extend(kvm_client *c, const char *seq_id, uint32_t n, kvm_seq_info *info)
{
	clear_err(c);
	Kvmesh__V1__ExtendSequenceRequest req = KVMESH__V1__EXTEND_SEQUENCE_REQUEST__INIT;
	req.sequence_id = (char *)seq_id;
	req.tokens = n;
	Kvmesh__V1__ExtendSequenceResponse *r = NULL;
	int rc = COORD(c, "ExtendSequence", &req, kvmesh__v1__extend_sequence_response, &r);
	if (rc)
		return rc;
	kvmesh__v1__extend_sequence_response__free_unpacked(r, NULL);
	/* The reply leaves the sequence's blocks out (sending them made every
	 * extend cost the sequence's length): ask for them only when wanted. */
	return info ? kvm_seq_get(c, seq_id, info) : 0;
}

int kvm_seq_release(kvm_client *c, const char *seq_id)
{
	clear_err(c);
	Kvmesh__V1__ReleaseSequenceRequest req = KVMESH__V1__RELEASE_SEQUENCE_REQUEST__INIT;
	req.sequence_id = (char *)seq_id;
	Kvmesh__V1__ReleaseSequenceResponse *r = NULL;
	int rc = COORD(c, "ReleaseSequence", &req, kvmesh__v1__release_sequence_response, &r);
	if (rc)
		return rc;
	kvmesh__v1__release_sequence_response__free_unpacked(r, NULL);
	pthread_mutex_lock(&c->mu);
	for (seq_state **pp = &c->seqs[data_id_of(seq_id) % SEQ_BUCKETS]; *pp; pp = &(*pp)->next)
		if (strcmp((*pp)->id, seq_id) == 0) {
			seq_state *s = *pp;
			*pp = s->next;
			free(s->pos);
			free(s);
			break;
		}
	pthread_mutex_unlock(&c->mu);
	return 0;
}

int kvm_match_prefix(kvm_client *c, const char *model_id, const uint32_t *tokens, uint32_t n,
		     uint32_t *matched_blocks)
{
	clear_err(c);
	if (!model_id || (n && !tokens) || !matched_blocks)
		return fail(c, -EINVAL, "match_prefix: bad arguments");
	Kvmesh__V1__MatchPrefixRequest req = KVMESH__V1__MATCH_PREFIX_REQUEST__INIT;
	req.model_id = (char *)model_id;
	req.tokens = (uint32_t *)tokens;
	req.n_tokens = n;
	Kvmesh__V1__MatchPrefixResponse *r = NULL;
	int rc = COORD(c, "MatchPrefix", &req, kvmesh__v1__match_prefix_response, &r);
	if (rc)
		return rc;
	*matched_blocks = r->matched_blocks;
	kvmesh__v1__match_prefix_response__free_unpacked(r, NULL);
	return 0;
}

/* ---- prefill write-back ------------------------------------------------------------ */

/* At most this many bytes of blocks in one PutBlocks call, and this many
 * calls in flight: the agents store one while the next is on the wire. */
#define PUT_BATCH_BYTES (16u << 20)
#define PUTS_IN_FLIGHT 4

/* One PutBlocks call in flight. */
typedef struct put_call {
	char where[128];
	uint32_t n;
	bool busy;
} put_call;

/* Starts PutBlocks of blocks [first, first + n) on `node` with pc as its tag. */
static int put_start(kvm_client *c, kvm_rpc_queue *q, put_call *pc, const char *node,
		     const char *model, const char *seq, uint32_t first, uint32_t n,
		     const void *const *blocks, uint8_t (*keys)[16], size_t block_bytes)
{
	kvm_rpc_channel *ch;
	int rc = node_lookup(c, node, &ch, NULL, 0);
	if (rc)
		return rc;
	Kvmesh__V1__BlockData *bd = calloc(n, sizeof(*bd));
	Kvmesh__V1__BlockData **bp = calloc(n, sizeof(*bp));
	uint8_t *buf = NULL;
	if (!bd || !bp) {
		rc = fail(c, -ENOMEM, "out of memory");
		goto out;
	}
	for (uint32_t i = 0; i < n; i++) {
		kvmesh__v1__block_data__init(&bd[i]);
		bd[i].key.data = keys[i];
		bd[i].key.len = 16;
		bd[i].data.data = (uint8_t *)blocks[i];
		bd[i].data.len = block_bytes;
		bp[i] = &bd[i];
	}
	Kvmesh__V1__PutBlocksRequest req = KVMESH__V1__PUT_BLOCKS_REQUEST__INIT;
	req.model_id = (char *)model;
	req.sequence_id = (char *)seq;
	req.first_index = first;
	req.blocks = bp;
	req.n_blocks = n;
	size_t len = kvmesh__v1__put_blocks_request__get_packed_size(&req);
	if (!(buf = malloc(len))) {
		rc = fail(c, -ENOMEM, "out of memory");
		goto out;
	}
	kvmesh__v1__put_blocks_request__pack(&req, buf);
	snprintf(pc->where, sizeof(pc->where), "agent %s", node);
	pc->n = n;
	rc = kvm_rpc_unary_start(ch, q, "/kvmesh.v1.Agent/PutBlocks", buf, len,
				 c->opts.control_timeout_ms, pc);
	if (rc)
		rc = fail(c, rc, "%s PutBlocks: %s", pc->where, kvm_strerror(rc));
	else
		pc->busy = true;
out:
	free(buf);
	free(bd);
	free(bp);
	return rc;
}

/* Waits for one PutBlocks call to end; returns its result (with the
 * client's error message when `report`: the first failure's message is the
 * one kept), and the blocks it stored in *stored. */
static int put_end(kvm_client *c, kvm_rpc_queue *q, size_t block_bytes, bool report,
		   uint32_t *stored)
{
	*stored = 0;
	void *tag, *out;
	size_t out_len;
	kvm_rpc_status st;
	int rc = kvm_rpc_queue_next(q, -1, &tag, &out, &out_len, &st);
	put_call *pc = tag;
	const char *where = pc ? pc->where : "agent";
	if (pc)
		pc->busy = false;
	if (rc != 1) {
		rc = rc < 0 ? rc : -EIO;
		return report ? fail(c, rc, "%s PutBlocks: %s", where, kvm_strerror(rc)) : rc;
	}
	if (st.code != KVM_RPC_OK) {
		rc = errno_of_status(st.code);
		return report ? fail(c, rc, "%s: %s", where, st.message) : rc;
	}
	Kvmesh__V1__PutBlocksResponse *r = kvmesh__v1__put_blocks_response__unpack(NULL, out_len, out);
	free(out);
	if (!r)
		return report ? fail(c, -EPROTO, "%s PutBlocks: malformed reply", where) : -EPROTO;
	kvmesh__v1__put_blocks_response__free_unpacked(r, NULL);
	c->blocks_written += pc->n;
	c->blocks_written_bytes += (uint64_t)pc->n * block_bytes;
	*stored = pc->n;
	return 0;
}

int kvm_seq_write_blocks(kvm_client *c, const char *seq_id, const uint32_t *tokens, uint32_t n_blocks,
			 const void *const *blocks, uint32_t *n_written)
{
	clear_err(c);
	if (n_written)
		*n_written = 0;
	if (!seq_id || (n_blocks && (!tokens || !blocks)))
		return fail(c, -EINVAL, "write_blocks: bad arguments");
	Kvmesh__V1__Sequence *s = NULL;
	int rc = get_seq_proto(c, seq_id, &s);
	if (rc)
		return rc;
	kvm_model m;
	if ((rc = kvm_model_get(c, s->model_id, &m)) != 0)
		goto out;
	uint64_t need = (uint64_t)n_blocks * m.block_tokens;
	if (s->n_blocks < n_blocks) {
		/* Room for the prompt first: the coordinator places the blocks. */
		kvmesh__v1__sequence__free_unpacked(s, NULL);
		s = NULL;
		Kvmesh__V1__Sequence *cur = NULL;
		if ((rc = get_seq_proto(c, seq_id, &cur)) != 0)
			return rc;
		uint64_t have = cur->tokens;
		kvmesh__v1__sequence__free_unpacked(cur, NULL);
		if (need > have && (rc = kvm_seq_extend(c, seq_id, (uint32_t)(need - have), NULL)) != 0)
			return rc;
		if ((rc = get_seq_proto(c, seq_id, &s)) != 0)
			return rc;
		if (s->n_blocks < n_blocks) {
			rc = fail(c, -EPROTO, "sequence %s has %zu blocks after extending for %u", seq_id, s->n_blocks,
				  n_blocks);
			goto out;
		}
	}
	if ((rc = seq_learn(c, s)) != 0)
		goto out;
	uint8_t(*keys)[16] = malloc((n_blocks ? n_blocks : 1) * sizeof(*keys));
	if (!keys) {
		rc = -ENOMEM;
		goto out;
	}
	uint64_t model_hash = XXH3_64bits(m.id, strlen(m.id));
	kvs_key parent = KVS_KEY_ROOT;
	for (uint32_t i = 0; i < n_blocks; i++) {
		parent = kvs_key_chain(parent, model_hash, tokens + (size_t)i * m.block_tokens, m.block_tokens);
		kvs_key_to_bytes(parent, keys[i]);
	}
	size_t bb = kvm_block_bytes(&m);
	uint32_t per_call = (uint32_t)(PUT_BATCH_BYTES / bb) ? (uint32_t)(PUT_BATCH_BYTES / bb) : 1;
	kvm_rpc_queue *q = NULL;
	if ((rc = kvm_rpc_queue_create(&q)) != 0) {
		free(keys);
		rc = fail(c, rc, "write_blocks: %s", kvm_strerror(rc));
		goto out;
	}
	/* Runs of consecutive unwritten blocks on one node go in one call; up
	 * to PUTS_IN_FLIGHT calls at once. After a failure nothing new starts,
	 * the calls in flight end, and the first error is returned. */
	put_call calls[PUTS_IN_FLIGHT] = {0};
	uint32_t busy = 0;
	for (uint32_t i = 0; (i < n_blocks && rc == 0) || busy > 0;) {
		if (busy == PUTS_IN_FLIGHT || i >= n_blocks || rc != 0) {
			uint32_t stored;
			int erc = put_end(c, q, bb, rc == 0, &stored);
			busy--;
			if (erc && !rc)
				rc = erc;
			if (n_written)
				*n_written += stored;
			continue;
		}
		const Kvmesh__V1__BlockPlacement *p = s->blocks[i];
		if (p->handle) { /* stored already (shared prefix or written before) */
			i++;
			continue;
		}
		uint32_t j = i + 1;
		while (j < n_blocks && j - i < per_call && !s->blocks[j]->handle &&
		       strcmp(s->blocks[j]->node_id, p->node_id) == 0)
			j++;
		put_call *pc = calls;
		while (pc->busy)
			pc++;
		rc = put_start(c, q, pc, p->node_id, m.id, seq_id, i, j - i, blocks + i, keys + i, bb);
		busy += rc == 0;
		i = j;
	}
	kvm_rpc_queue_destroy(q);
	free(keys);
	if (rc == 0) {
		pthread_mutex_lock(&c->mu);
		seq_state *st = seq_find(c, seq_id);
		for (uint32_t l = 0; st && l < m.layers; l++)
			if (st->pos[l] < need)
				st->pos[l] = (uint32_t)need;
		pthread_mutex_unlock(&c->mu);
	}
out:
	if (s)
		kvmesh__v1__sequence__free_unpacked(s, NULL);
	return rc;
}

/* ---- decode over the data plane ---------------------------------------------------- */

static wire_handle seq_handle(uint64_t data_id)
{
	return (wire_handle){.slot = (uint32_t)data_id, .gen = (uint32_t)(data_id >> 32),
			     .arena = WIRE_ARENA_SEQUENCE};
}

/* What a query of a batch needs from the client's record of its sequence. */
typedef struct seq_ref {
	char home[ID_MAX];
	char home_data[128];
	uint64_t data_id;
	uint32_t pos;
} seq_ref;

/* Finds (learning it from the coordinator if needed) a sequence's home and
 * position in `layer`. */
static int seq_ref_get(kvm_client *c, const char *id, uint32_t layer, seq_ref *out)
{
	for (int attempt = 0; attempt < 2; attempt++) {
		pthread_mutex_lock(&c->mu);
		seq_state *s = seq_find(c, id);
		if (s && layer >= s->layers) {
			uint32_t layers = s->layers;
			pthread_mutex_unlock(&c->mu);
			return fail(c, -EINVAL, "layer %u of a model with %u layers", layer, layers);
		}
		if (s) {
			snprintf(out->home, sizeof(out->home), "%s", s->home);
			snprintf(out->home_data, sizeof(out->home_data), "%s", s->home_data);
			out->data_id = s->data_id;
			out->pos = s->pos[layer];
			pthread_mutex_unlock(&c->mu);
			return 0;
		}
		pthread_mutex_unlock(&c->mu);
		if (attempt == 0) {
			Kvmesh__V1__Sequence *p = NULL;
			int rc = get_seq_proto(c, id, &p);
			if (rc)
				return rc;
			rc = seq_learn(c, p);
			kvmesh__v1__sequence__free_unpacked(p, NULL);
			if (rc)
				return rc;
		}
	}
	return -ENOENT;
}

static void seq_advance(kvm_client *c, const char *id, uint32_t layer, uint32_t n)
{
	pthread_mutex_lock(&c->mu);
	seq_state *s = seq_find(c, id);
	if (s)
		s->pos[layer] += n;
	pthread_mutex_unlock(&c->mu);
}

/* Says which nodes of a sequence answer and which do not, after a decode step
 * failed: pings the data plane of every node holding its blocks. */
static void explain_failure(kvm_client *c, const char *seq_id, int status, char *msg, size_t cap)
{
	size_t len = (size_t)snprintf(msg, cap, "sequence %s: %s", seq_id, kvm_strerror(status));
	Kvmesh__V1__Sequence *s = NULL;
	if (get_seq_proto(c, seq_id, &s) != 0)
		return;
	/* Group block indexes by node, in order of first appearance. */
	for (size_t b = 0; b < s->n_blocks && len < cap; b++) {
		const char *node = s->blocks[b]->node_id;
		int seen = 0;
		for (size_t e = 0; e < b && !seen; e++)
			seen = strcmp(s->blocks[e]->node_id, node) == 0;
		if (seen)
			continue;
		char data[128] = "";
		xport_peer *peer = NULL;
		int prc = node_lookup(c, node, NULL, data, sizeof(data));
		if (prc == 0)
			prc = data_peer_get(c, data, &peer);
		if (prc == 0) {
			xport_waiter w;
			waiter_start(&w);
			prc = waiter_finish(&w, xport_ping(peer, 1000, xport_waiter_cb, &w));
			if (prc != 0)
				data_peer_drop(c, data);
		}
		if (prc == 0)
			continue;
		/* List this node's blocks as ranges. */
		len += (size_t)snprintf(msg + len, cap - len, "; node %s (%s) does not answer (%s), holding blocks",
				       node, data, kvm_strerror(prc));
		for (size_t e = b; e < s->n_blocks && len < cap; e++) {
			if (strcmp(s->blocks[e]->node_id, node) != 0)
				continue;
			size_t f = e;
			while (f + 1 < s->n_blocks && strcmp(s->blocks[f + 1]->node_id, node) == 0)
				f++;
			len += (size_t)(f > e ? snprintf(msg + len, cap - len, " %zu-%zu", e, f)
					      : snprintf(msg + len, cap - len, " %zu", e));
			e = f;
		}
	}
	if (s->degraded && len < cap)
		snprintf(msg + len, cap - len, "; the coordinator marks it degraded");
	kvmesh__v1__sequence__free_unpacked(s, NULL);
}

/* One home agent's share of a batch. */
typedef struct home_batch {
	char addr[128];
	xport_peer *peer;
	uint32_t n;
	uint32_t *qi;          /* indexes into the caller's array */
	xport_append_io *app;
	xport_attend_query *att;
	wire_handle *h;
	xport_waiter w_app, w_att; /* the APPEND_KV and the ATTEND */
	int rc, rc_app;
} home_batch;

/* One pass of kvm_attend_append: each query's status in q[i].status; returns
 * an error only for the batch as a whole (bad input, no memory). */
static int attend_round(kvm_client *c, uint32_t layer, float scale, kvm_attend *q, uint32_t n)
{
	seq_ref *refs = calloc(n, sizeof(*refs));
	home_batch *hb = calloc(n, sizeof(*hb));
	uint32_t *qi = calloc(n, sizeof(*qi));
	xport_append_io *app = calloc(n, sizeof(*app));
	xport_attend_query *att = calloc(n, sizeof(*att));
	wire_handle *h = calloc(n, sizeof(*h));
	int rc = 0;
	if (!refs || !hb || !qi || !app || !att || !h) {
		rc = -ENOMEM;
		goto out;
	}
	/* All queries are of one model: take it from the first sequence. */
	kvm_model m = {0};
	char model[ID_MAX] = "";
	for (uint32_t i = 0; i < n; i++) {
		q[i].status = 0;
		if (!q[i].seq_id || !q[i].q || !q[i].k_new || !q[i].v_new || !q[i].o || !q[i].lse) {
			rc = fail(c, -EINVAL, "attend_append: query %u has a NULL pointer", i);
			goto out;
		}
		if ((rc = seq_ref_get(c, q[i].seq_id, layer, &refs[i])) != 0)
			goto out;
		pthread_mutex_lock(&c->mu);
		seq_state *s = seq_find(c, q[i].seq_id);
		if (s && !model[0])
			snprintf(model, sizeof(model), "%s", s->model);
		int other = s && strcmp(s->model, model) != 0;
		pthread_mutex_unlock(&c->mu);
		if (other) {
			rc = fail(c, -EINVAL, "attend_append: sequence %s is of another model than %s", q[i].seq_id,
				  model);
			goto out;
		}
	}
	if ((rc = kvm_model_get(c, model, &m)) != 0)
		goto out;
	if (layer >= m.layers) {
		rc = fail(c, -EINVAL, "attend_append: layer %u of a model with %u layers", layer, m.layers);
		goto out;
	}
	if (scale == 0.0f)
		scale = 1.0f / sqrtf((float)m.head_dim);
	/* Group by home agent, keeping the caller's order inside each group. */
	uint32_t n_homes = 0, used = 0;
	for (uint32_t i = 0; i < n; i++) {
		uint32_t b;
		for (b = 0; b < n_homes && strcmp(hb[b].addr, refs[i].home_data) != 0; b++)
			;
		if (b == n_homes) {
			snprintf(hb[b].addr, sizeof(hb[b].addr), "%s", refs[i].home_data);
			xport_waiter_init(&hb[b].w_app);
			xport_waiter_init(&hb[b].w_att);
			n_homes++;
		}
	}
	for (uint32_t b = 0; b < n_homes; b++) {
		hb[b].qi = qi + used;
		hb[b].app = app + used;
		hb[b].att = att + used;
		hb[b].h = h + used;
		for (uint32_t i = 0; i < n; i++)
			if (strcmp(refs[i].home_data, hb[b].addr) == 0)
				hb[b].qi[hb[b].n++] = i;
		used += hb[b].n;
		hb[b].rc = data_peer_get(c, hb[b].addr, &hb[b].peer);
	}
	size_t row = kvm_row_bytes(&m);
	for (uint32_t b = 0; b < n_homes; b++)
		for (uint32_t k = 0; k < hb[b].n; k++) {
			uint32_t i = hb[b].qi[k];
			hb[b].h[k] = seq_handle(refs[i].data_id);
			hb[b].app[k] = (xport_append_io){
				.ref = {.h = hb[b].h[k], .layer = layer, .token = refs[i].pos, .n_tokens = 1,
					.bytes = (uint32_t)row},
				.k = q[i].k_new,
				.v = q[i].v_new};
			hb[b].att[k] = (xport_attend_query){.n_tokens = refs[i].pos + 1,
							    .n_blocks = 1,
							    .blocks = &hb[b].h[k],
							    .q = q[i].q,
							    .o = q[i].o,
							    .lse = q[i].lse};
		}
	wire_shape shape = {.q_heads = m.q_heads,
			    .kv_heads = m.kv_heads,
			    .head_dim = m.head_dim,
			    .block_tokens = m.block_tokens,
			    .layer = layer,
			    .kv_dtype = m.dtype == KVM_F32 ? 0u : m.dtype == KVM_F16 ? 1u : 2u,
			    .scale = scale};
	/* To every home at once: the new K/V rows, then the queries right
	 * behind them on the same connection (one round trip). The home
	 * applies an APPEND_KV when its frame arrives, before it reads the
	 * next frame, so the ATTEND sees the row; an append that fails makes
	 * the attend fail too, and the append's error is the one reported. */
	for (uint32_t b = 0; b < n_homes; b++) {
		home_batch *hh = &hb[b];
		if (hh->rc)
			continue;
		uint32_t t = (uint32_t)c->opts.data_timeout_ms;
		xport_waiter_add(&hh->w_app, 1);
		int arc = xport_append(hh->peer, hh->app, hh->n, t, xport_waiter_cb, &hh->w_app);
		if (arc) {
			xport_waiter_cb(&hh->w_app, arc);
			continue;
		}
		xport_waiter_add(&hh->w_att, 1);
		if ((arc = xport_attend(hh->peer, &shape, hh->att, hh->n, t, xport_waiter_cb, &hh->w_att)) != 0)
			xport_waiter_cb(&hh->w_att, arc);
	}
	for (uint32_t b = 0; b < n_homes; b++) {
		home_batch *hh = &hb[b];
		if (hh->rc)
			continue;
		hh->rc_app = xport_waiter_wait(&hh->w_app);
		hh->rc = xport_waiter_wait(&hh->w_att);
		for (uint32_t k = 0; !hh->rc_app && k < hh->n; k++)
			if (hh->app[k].status == 0)
				seq_advance(c, q[hh->qi[k]].seq_id, layer, 1);
		if (hh->rc_app)
			hh->rc = hh->rc_app;
	}
	uint64_t qbytes = (uint64_t)m.q_heads * m.head_dim * 4, obytes = qbytes + (uint64_t)m.q_heads * 4;
	for (uint32_t b = 0; b < n_homes; b++) {
		home_batch *hh = &hb[b];
		/* The two requests (header, metadata, bulk) and their replies. */
		c->bytes_out += WIRE_HDR_LEN + wire_append_req_size(hh->n) + (uint64_t)hh->n * 2 * row +
				WIRE_HDR_LEN + wire_attend_req_size(hh->n, hh->n) + (uint64_t)hh->n * qbytes;
		c->bytes_in += 2 * (WIRE_HDR_LEN + wire_status_reply_size(hh->n)) + (uint64_t)hh->n * obytes;
		for (uint32_t k = 0; k < hh->n; k++) {
			uint32_t i = hh->qi[k];
			int st = hh->rc_app ? hh->rc_app
				 : hh->app[k].status ? hh->app[k].status
				 : hh->rc ? hh->rc : hh->att[k].status;
			q[i].status = st;
		}
	}
	c->attend_queries += n;
out:
	for (uint32_t b = 0; hb && b < n; b++)
		if (hb[b].addr[0]) {
			xport_waiter_destroy(&hb[b].w_app);
			xport_waiter_destroy(&hb[b].w_att);
		}
	free(refs);
	free(hb);
	free(qi);
	free(app);
	free(att);
	free(h);
	return rc;
}

/* Learns a sequence's home again from the coordinator (its positions stay:
 * the client is their only writer). */
static int seq_rehome(kvm_client *c, const char *id)
{
	Kvmesh__V1__Sequence *p = NULL;
	int rc = get_seq_proto(c, id, &p);
	if (rc == 0) {
		rc = seq_learn(c, p);
		kvmesh__v1__sequence__free_unpacked(p, NULL);
	}
	return rc;
}

/* seq_rehome, saying whether the home is another node than the client had. */
static int seq_rehome_moved(kvm_client *c, const char *id, bool *moved)
{
	char was[ID_MAX] = "";
	pthread_mutex_lock(&c->mu);
	seq_state *s = seq_find(c, id);
	if (s)
		snprintf(was, sizeof(was), "%s", s->home);
	pthread_mutex_unlock(&c->mu);
	int rc = seq_rehome(c, id);
	pthread_mutex_lock(&c->mu);
	s = seq_find(c, id);
	*moved = rc == 0 && s && strcmp(was, s->home) != 0;
	pthread_mutex_unlock(&c->mu);
	return rc;
}

/* A drain hands a sequence to a new home within a few heartbeats; until
 * the coordinator names it, the old home refuses appends with -EXDEV. The
 * waits stay short (a hand-off takes tens of ms: a long wait would only
 * overshoot it), and add up to about 8 s (a target that does not answer
 * holds a hand-off up to 15 s, then the old home serves it again). */
#define MOVED_RETRIES 100
#define MOVED_BACKOFF_MAX_MS 80

/* The n-th wait (n >= 1): 10, 20, 40, 80, 80, ... ms. */
static void moved_backoff(int n)
{
	int ms = 10 << (n < 4 ? n - 1 : 3);
	usleep((useconds_t)(ms < MOVED_BACKOFF_MAX_MS ? ms : MOVED_BACKOFF_MAX_MS) * 1000);
}

int kvm_attend_append(kvm_client *c, uint32_t layer, float scale, kvm_attend *q, uint32_t n)
{
	clear_err(c);
	if (!q || n == 0)
		return fail(c, -EINVAL, "attend_append: an empty batch");
	int rc = attend_round(c, layer, scale, q, n);
	/* A home that moved refuses the append (-EXDEV: nothing applied); a home
	 * that handed its sequences off and left cannot be reached. Either way
	 * the query runs again at the home the coordinator names now (after a
	 * failure of another kind, only if that is another node). */
	kvm_attend *again = calloc(n, sizeof(*again));
	uint32_t *from = calloc(n, sizeof(*from));
	if (!again || !from)
		rc = rc ? rc : -ENOMEM;
	for (int attempt = 0; rc == 0 && attempt < MOVED_RETRIES; attempt++) {
		uint32_t k = 0;
		for (uint32_t i = 0; i < n; i++) {
			if (q[i].status == 0 || (q[i].status != -EXDEV && attempt > 0))
				continue;
			bool moved = false;
			if (seq_rehome_moved(c, q[i].seq_id, &moved) != 0 ||
			    (!moved && q[i].status != -EXDEV))
				continue;
			again[k] = q[i];
			from[k++] = i;
		}
		if (k == 0)
			break;
		if (attempt)
			moved_backoff(attempt);
		rc = attend_round(c, layer, scale, again, k);
		for (uint32_t j = 0; rc == 0 && j < k; j++)
			q[from[j]].status = again[j].status;
	}
	free(again);
	free(from);
	if (rc) {
		const char *b = err_buf(c);
		return b && b[0] ? rc : fail(c, rc, "attend_append: %s", kvm_strerror(rc));
	}
	for (uint32_t i = 0; i < n; i++)
		if (q[i].status) {
			char msg[ERR_MAX];
			explain_failure(c, q[i].seq_id, q[i].status, msg, sizeof(msg));
			return fail(c, q[i].status, "%s", msg);
		}
	return 0;
}

int kvm_append_kv(kvm_client *c, const char *seq_id, uint32_t layer, uint32_t n_tokens, const void *k,
		  const void *v)
{
	clear_err(c);
	if (!seq_id || !k || !v || n_tokens == 0)
		return fail(c, -EINVAL, "append_kv: bad arguments");
	seq_ref r;
	int rc = seq_ref_get(c, seq_id, 0, &r);
	if (rc)
		return rc;
	pthread_mutex_lock(&c->mu);
	seq_state *s = seq_find(c, seq_id);
	char model[ID_MAX];
	snprintf(model, sizeof(model), "%s", s ? s->model : "");
	pthread_mutex_unlock(&c->mu);
	kvm_model m;
	if ((rc = kvm_model_get(c, model, &m)) != 0)
		return rc;
	if (layer >= m.layers)
		return fail(c, -EINVAL, "append_kv: layer %u of a model with %u layers", layer, m.layers);
	if ((rc = seq_ref_get(c, seq_id, layer, &r)) != 0)
		return rc;
	xport_peer *peer;
	if ((rc = data_peer_get(c, r.home_data, &peer)) != 0)
		return rc;
	size_t row = kvm_row_bytes(&m);
	/* One entry carries at most one block's worth of rows, so that no entry
	 * is larger than the peer's per-entry limit. */
	uint32_t done = 0;
	int moved = 0;
	while (done < n_tokens && (rc == 0 || (rc == -EXDEV && moved < MOVED_RETRIES))) {
		if (rc == -EXDEV) { /* the home moved (nothing applied): ask where to */
			if (moved++)
				moved_backoff(moved - 1);
			if ((rc = seq_rehome(c, seq_id)) != 0)
				break;
			pthread_mutex_lock(&c->mu);
			seq_state *ss = seq_find(c, seq_id);
			if (ss) {
				snprintf(r.home, sizeof(r.home), "%s", ss->home);
				snprintf(r.home_data, sizeof(r.home_data), "%s", ss->home_data);
			}
			pthread_mutex_unlock(&c->mu);
			if ((rc = data_peer_get(c, r.home_data, &peer)) != 0)
				break;
		}
		uint32_t take = n_tokens - done < m.block_tokens ? n_tokens - done : m.block_tokens;
		xport_append_io a = {.ref = {.h = seq_handle(r.data_id),
					     .layer = layer,
					     .token = r.pos + done,
					     .n_tokens = take,
					     .bytes = (uint32_t)(take * row)},
				     .k = (const uint8_t *)k + done * row,
				     .v = (const uint8_t *)v + done * row};
		xport_waiter w;
		waiter_start(&w);
		rc = waiter_finish(&w, xport_append(peer, &a, 1, (uint32_t)c->opts.data_timeout_ms, xport_waiter_cb, &w));
		if (rc == 0)
			rc = a.status;
		c->bytes_out += WIRE_HDR_LEN + wire_append_req_size(1) + 2ull * take * row;
		if (rc == 0) {
			seq_advance(c, seq_id, layer, take);
			done += take;
		}
	}
	if (rc)
		return fail(c, rc, "append_kv: sequence %s layer %u on home %s: %s", seq_id, layer, r.home,
			    kvm_strerror(rc));
	return 0;
}

/* ---- reading blocks back ---------------------------------------------------------- */

int kvm_seq_read_blocks(kvm_client *c, const char *seq_id, uint32_t first, uint32_t n, void *const *bufs)
{
	clear_err(c);
	if (!seq_id || (n && !bufs))
		return fail(c, -EINVAL, "read_blocks: bad arguments");
	Kvmesh__V1__Sequence *s = NULL;
	int rc = get_seq_proto(c, seq_id, &s);
	if (rc)
		return rc;
	kvm_model m;
	if ((rc = kvm_model_get(c, s->model_id, &m)) != 0)
		goto out;
	if ((uint64_t)first + n > s->n_blocks) {
		rc = fail(c, -ERANGE, "read_blocks: blocks %u..%u of a sequence of %zu blocks", first,
			  first + n - 1, s->n_blocks);
		goto out;
	}
	size_t bb = kvm_block_bytes(&m);
	for (uint32_t i = first; i < first + n && rc == 0; i++) {
		const Kvmesh__V1__BlockPlacement *p = s->blocks[i];
		if (!p->handle) {
			rc = fail(c, -ENODATA, "read_blocks: block %u of %s is not stored yet (the tail, or not written)",
				  i, seq_id);
			break;
		}
		xport_peer *peer;
		if ((rc = data_peer_get(c, p->data_address, &peer)) != 0)
			break;
		xport_block_io io = {.ref = {.h = {.slot = p->handle->slot,
						   .gen = p->handle->generation,
						   .arena = p->handle->tier == KVMESH__V1__TIER__TIER_GPU ? 1 : 0},
					     .offset = 0,
					     .len = (uint32_t)bb},
				     .buf = bufs[i - first]};
		xport_waiter w;
		waiter_start(&w);
		rc = waiter_finish(&w, xport_get_blocks(peer, &io, 1, (uint32_t)c->opts.data_timeout_ms, xport_waiter_cb,
							&w));
		if (rc == 0)
			rc = io.status;
		c->bytes_in += WIRE_HDR_LEN + bb;
		if (rc)
			fail(c, rc, "read_blocks: block %u of %s on node %s: %s", i, seq_id, p->node_id,
			     kvm_strerror(rc));
	}
out:
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return rc;
}
