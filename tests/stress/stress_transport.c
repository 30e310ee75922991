/* A plain program (no Criterion: it cannot start under ThreadSanitizer, see
 * Snaipe/Criterion#274) that drives the TCP transport's threads through
 * their racy moments: two application threads pipelining GET/PUT/PING on one
 * peer, requests timing out, a peer closed with requests in flight, a server
 * closed under load. `make tsan-transport` builds it with -fsanitize=thread
 * and runs it; it prints "stress ok" and "1 passed, 0 failed" and exits 0, or
 * names what failed and exits 1. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "transport/transport.h"

#define NSLOTS 16
#define SLOT (256u << 10)

struct store {
	pthread_mutex_t mu;
	uint8_t *mem;
};

static int h_get(void *ctx, const wire_block_ref *r, const void **data, void **pin, uint64_t *csum)
{
	struct store *s = ctx;
	(void)csum;
	if (r->h.slot >= NSLOTS || (uint64_t)r->offset + r->len > SLOT)
		return -ENOENT;
	*data = s->mem + (size_t)r->h.slot * SLOT + r->offset;
	*pin = NULL;
	return 0;
}

/* PUTs go to slots 8..15 into private staging, committed under the lock;
 * GETs read slots 0..7, which nobody writes. */
static int h_put_prepare(void *ctx, const wire_block_ref *r, void **dst, void **txn)
{
	(void)ctx;
	if (r->h.slot < 8 || r->h.slot >= NSLOTS || (uint64_t)r->offset + r->len > SLOT)
		return -ERANGE;
	*dst = *txn = malloc(r->len);
	return 0;
}

static int h_put_commit(void *ctx, const wire_block_ref *r, void *txn, int status, uint64_t csum)
{
	struct store *s = ctx;
	(void)csum;
	if (status == 0) {
		pthread_mutex_lock(&s->mu);
		memcpy(s->mem + (size_t)r->h.slot * SLOT + r->offset, txn, r->len);
		pthread_mutex_unlock(&s->mu);
	}
	free(txn);
	return status;
}

/* ATTEND deferred to a worker thread, completed from there. */
struct job {
	const wire_attend_view *v;
	const float *q;
	float *o, *lse;
	int *st;
	xport_attend_token *tok;
};

static void *attend_worker(void *arg)
{
	struct job *j = arg;
	size_t hd = (size_t)j->v->shape.q_heads * j->v->shape.head_dim;
	for (uint32_t i = 0; i < j->v->n_queries; i++) {
		for (size_t k = 0; k < hd; k++)
			j->o[i * hd + k] = 2.0f * j->q[i * hd + k];
		for (uint32_t h = 0; h < j->v->shape.q_heads; h++)
			j->lse[(size_t)i * j->v->shape.q_heads + h] = 1.0f;
		j->st[i] = 0;
	}
	xport_attend_complete(j->tok, 0);
	free(j);
	return NULL;
}

static int h_attend(void *ctx, const wire_attend_view *v, const float *q, float *o, float *lse, int *st,
		    xport_attend_token *tok)
{
	(void)ctx;
	struct job *j = malloc(sizeof *j);
	*j = (struct job){v, q, o, lse, st, tok};
	pthread_t th;
	pthread_create(&th, NULL, attend_worker, j);
	pthread_detach(th);
	return XPORT_DEFERRED;
}

static const xport_handlers handlers = {
	.get = h_get, .put_prepare = h_put_prepare, .put_commit = h_put_commit, .attend = h_attend};

struct worker {
	xport_peer *p;
	int id;
	int bad;
};

static void *work(void *arg)
{
	struct worker *w = arg;
	enum { N = 64 };
	uint8_t *buf = malloc((size_t)N * SLOT);
	xport_block_io io[N];
	xport_waiter wt;
	xport_waiter_init(&wt);
	for (int round = 0; round < 4; round++) {
		xport_waiter_add(&wt, N);
		for (int i = 0; i < N; i++) {
			uint8_t *b = buf + (size_t)i * SLOT;
			int put = (i + round + w->id) % 3 == 0;
			uint32_t slot = put ? 8 + (uint32_t)(w->id * 4 + i % 4) : (uint32_t)(i % 8);
			if (put)
				memset(b, w->id + 1, SLOT);
			io[i] = (xport_block_io){.ref = {{slot, 1, 0}, 0, SLOT}, .buf = b};
			int rc = i % 7 == 6 ? xport_ping(w->p, 5000, xport_waiter_cb, &wt)
				 : put    ? xport_put_blocks(w->p, &io[i], 1, 5000, xport_waiter_cb, &wt)
					  : xport_get_blocks(w->p, &io[i], 1, 5000, xport_waiter_cb, &wt);
			if (rc)
				xport_waiter_cb(&wt, rc);
		}
		if (xport_waiter_wait(&wt))
			w->bad++;
		for (int i = 0; i < N; i++)
			if (i % 7 != 6 && io[i].ref.h.slot < 8 && buf[(size_t)i * SLOT + 5] != (uint8_t)(io[i].ref.h.slot * 3))
				w->bad++;
	}
	xport_waiter_destroy(&wt);
	free(buf);
	return NULL;
}

static void count_cb(void *arg, int status)
{
	(void)status;
	atomic_fetch_add((atomic_int *)arg, 1);
}

int main(void)
{
	setenv("KVMESH_LOG_LEVEL", "error", 0);
	struct store st = {.mem = malloc((size_t)NSLOTS * SLOT)};
	pthread_mutex_init(&st.mu, NULL);
	for (int i = 0; i < NSLOTS; i++)
		memset(st.mem + (size_t)i * SLOT, i * 3, SLOT);
	xport_loop *sl, *cl;
	xport_server *srv;
	if (xport_loop_create(&sl) || xport_loop_create(&cl) ||
	    xport_tcp_listen(sl, "127.0.0.1", 0, NULL, &handlers, &st, &srv))
		return fprintf(stderr, "setup failed\n"), 1;
	xport_opts o;
	xport_opts_default(&o);
	o.n_conns = 3;
	xport_peer *p;
	if (xport_tcp_connect(cl, "127.0.0.1", srv->port, &o, &p))
		return fprintf(stderr, "connect failed\n"), 1;

	/* Two application threads on one peer. */
	pthread_t th[2];
	struct worker w[2] = {{p, 0, 0}, {p, 1, 0}};
	for (int i = 0; i < 2; i++)
		pthread_create(&th[i], NULL, work, &w[i]);
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	if (w[0].bad || w[1].bad)
		return fprintf(stderr, "worker errors: %d %d\n", w[0].bad, w[1].bad), 1;

	/* Deferred ATTENDs, many in flight, completed from worker threads. */
	{
		enum { NA = 16 };
		wire_shape sh = {.q_heads = 4, .kv_heads = 1, .head_dim = 32, .block_tokens = 16, .scale = 0.2f};
		static float q[NA][128], ao[NA][128], al[NA][4];
		wire_handle hb = {0, 1, 0};
		xport_attend_query aq[NA];
		xport_waiter wa;
		xport_waiter_init(&wa);
		xport_waiter_add(&wa, NA);
		for (int i = 0; i < NA; i++) {
			for (int k = 0; k < 128; k++)
				q[i][k] = (float)(i * 128 + k);
			aq[i] = (xport_attend_query){.n_tokens = 5, .n_blocks = 1, .blocks = &hb, .q = q[i], .o = ao[i], .lse = al[i]};
			if (xport_attend(p, &sh, &aq[i], 1, 5000, xport_waiter_cb, &wa))
				xport_waiter_cb(&wa, -EIO);
		}
		if (xport_waiter_wait(&wa))
			return fprintf(stderr, "deferred attend failed\n"), 1;
		for (int i = 0; i < NA; i++)
			if (ao[i][7] != 2.0f * q[i][7] || al[i][3] != 1.0f)
				return fprintf(stderr, "deferred attend: wrong result %d\n", i), 1;
		xport_waiter_destroy(&wa);
	}

	/* Close a peer with requests in flight: every callback runs once. */
	atomic_int done = 0;
	uint8_t *buf = malloc((size_t)32 * SLOT);
	xport_block_io io[32];
	for (int i = 0; i < 32; i++) {
		io[i] = (xport_block_io){.ref = {{(uint32_t)(i % 8), 1, 0}, 0, SLOT}, .buf = buf + (size_t)i * SLOT};
		if (xport_get_blocks(p, &io[i], 1, 5000, count_cb, &done))
			atomic_fetch_add(&done, 1);
	}
	xport_close(p);
	if (atomic_load(&done) != 32)
		return fprintf(stderr, "close: %d of 32 callbacks\n", atomic_load(&done)), 1;

	/* Close the server under load. */
	if (xport_tcp_connect(cl, "127.0.0.1", srv->port, &o, &p))
		return fprintf(stderr, "reconnect failed\n"), 1;
	xport_waiter wt;
	xport_waiter_init(&wt);
	xport_waiter_add(&wt, 32);
	for (int i = 0; i < 32; i++)
		if (xport_get_blocks(p, &io[i], 1, 2000, xport_waiter_cb, &wt))
			xport_waiter_cb(&wt, -EIO);
	xport_server_close(srv);
	int rc = xport_waiter_wait(&wt);
	if (rc && rc != -ECONNRESET && rc != -ENOTCONN)
		return fprintf(stderr, "server close: %d\n", rc), 1;
	xport_waiter_destroy(&wt);
	xport_close(p);
	xport_loop_destroy(cl);
	xport_loop_destroy(sl);
	free(buf);
	free(st.mem);
	printf("stress ok\n1 passed, 0 failed\n"); /* the runner counts this line */
	return 0;
}
