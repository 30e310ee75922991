/* The RDMA backend of the data plane: one-sided READ for GET_BLOCKS, WRITE for
 * PUT_BLOCKS, everything else over an inner TCP peer (xport_tcp_ops).
 *
 * Why a TCP peer inside: the queue pair is set up over the TCP channel anyway, the
 * server must check every handle before its bytes are read (generations live in
 * the store, not in the registered bytes), and ATTEND/APPEND/PING already work
 * there. So a one-sided request is three steps, each visible in docs/rdma.md:
 *   1. BEGIN: one APPEND_KV frame of control entries (arena | 0x80) on the TCP
 *      channel; the server's wrapper handler runs the store's get / put_prepare
 *      for each entry (generation, range), holds the pin or transaction, and
 *      answers per entry. A stale handle stops here with -ESTALE.
 *   2. READ or WRITE of every accepted entry, remote offset slot * slot_bytes +
 *      offset (the server checked that the store's pointer is exactly there).
 *   3. END: a second control frame releases the pins (GET) or commits or aborts
 *      the transactions (PUT); a PUT completes only once its commit is answered.
 *
 * Threads: the submitting thread only allocates the request and sends BEGIN (the
 * TCP peer is thread-safe). Everything after that runs on the loop thread: the
 * BEGIN and END callbacks, posting work requests, the completion channel (a
 * loop_src) and the deadline ticker. The op list is shared with submitters and
 * close, under p->mu; the verbs objects are touched on the loop thread only. */
#include "transport/rdma_xport.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>

#include "common/log.h"
#include "transport/loop_int.h"

/* Control entries: an APPEND_KV entry whose arena byte has bit 7 set. Its n_tokens
 * field is the control op, layer/token carry the block's offset/length, and k is a
 * struct ctl_key (16 bytes, v 16 zero bytes), except CONNECT whose k and v are 48
 * bytes: the client's packed xrdma_peer and zeros. */
#define CTL_FLAG 0x80u
#define CTL_ARENA 0xFFu /* CONNECT and the server-description GET */
enum ctl_op {
	CTL_CONNECT = 1,   /* h.slot = the client's token */
	CTL_GET_BEGIN = 2, /* pin for READ */
	CTL_GET_END = 3,   /* unpin */
	CTL_PUT_BEGIN = 4, /* put_prepare for WRITE */
	CTL_PUT_COMMIT = 5,
	CTL_PUT_ABORT = 6,
};
#define CTL_KEY_LEN 16
/* The server description a client fetches with a GET of {CTL_ARENA, token}:
 * packed xrdma_peer (48), slot_bytes (u64), arena (u8), 7 zero bytes. */
#define SRV_INFO_LEN 64
#define MAX_SRV_CONNS 1024
#define DEFAULT_DEPTH 64

static void put_le32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static void put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_le32(const uint8_t *p)
{
	uint32_t v = 0;
	for (int i = 0; i < 4; i++)
		v |= (uint32_t)p[i] << (8 * i);
	return v;
}
static uint64_t get_le64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

static const uint8_t zeros[XRDMA_PEER_WIRE_SIZE];

/* ---- client ------------------------------------------------------------------ */

enum op_phase { PH_BEGIN, PH_RDMA, PH_END };

struct rop {
	struct rop *next, *prev; /* p->ops */
	struct rop *qnext;       /* p->postq: waiting for send-queue room */
	struct rpeer *p;
	uint64_t id;
	bool is_put;
	enum op_phase phase;
	xport_block_io *b;
	uint32_t n;
	int64_t deadline_ns;
	xport_cb cb;
	void *arg;
	uint32_t next_post;   /* next entry to consider posting */
	uint32_t wr_out;      /* work requests posted, not completed */
	int err;              /* first error */
	xport_append_io *ctl; /* n control entries (BEGIN, then END) */
	uint8_t *keys;        /* n * CTL_KEY_LEN */
	uint32_t *end_idx;    /* END entry j belongs to block entry end_idx[j] */
};

struct rpeer {
	xport_peer pub;
	xport_loop *loop;
	xport_peer *tcp;
	struct xrdma_conn *qp;
	struct xrdma_mr *mr;
	uint32_t depth, token;
	uint64_t slot_bytes;
	uint8_t arena;
	struct loop_src src;
	struct loop_ticker ticker;
	pthread_mutex_t mu;
	struct rop *ops; /* every op not yet finished */
	uint64_t next_id;
	bool closing;
	/* loop thread only */
	struct rop *postq_head, *postq_tail;
	uint32_t wr_out;
	int qp_err; /* 0, or why the QP may carry nothing more */
};

static bool is_closing(struct rpeer *p)
{
	return __atomic_load_n(&p->closing, __ATOMIC_ACQUIRE);
}

static uint64_t wr_id_of(const struct rop *op, uint32_t i)
{
	return op->id << 24 | i;
}

static void rop_free(struct rop *op)
{
	free(op->ctl);
	free(op->keys);
	free(op->end_idx);
	free(op);
}

static void ops_unlink(struct rpeer *p, struct rop *op)
{
	if (op->prev)
		op->prev->next = op->next;
	else
		p->ops = op->next;
	if (op->next)
		op->next->prev = op->prev;
	op->next = op->prev = NULL;
}

static void postq_remove(struct rpeer *p, struct rop *op)
{
	struct rop **pp = &p->postq_head, *prev = NULL;
	while (*pp && *pp != op) {
		prev = *pp;
		pp = &(*pp)->qnext;
	}
	if (!*pp)
		return;
	*pp = op->qnext;
	if (p->postq_tail == op)
		p->postq_tail = prev;
	op->qnext = NULL;
}

/* Loop thread. Runs the user's callback (outside p->mu) and frees op. Work
 * requests still out for it find no op when they complete and are dropped. */
static void rop_finish(struct rop *op, int status)
{
	struct rpeer *p = op->p;
	postq_remove(p, op);
	pthread_mutex_lock(&p->mu);
	ops_unlink(p, op);
	pthread_mutex_unlock(&p->mu);
	if (status)
		kvm_log(KVM_LOG_DEBUG, "xport_rdma_req_failed", "op=%s id=%llu err=\"%s\"",
			op->is_put ? "PUT_BLOCKS" : "GET_BLOCKS", (unsigned long long)op->id,
			strerror(-status));
	op->cb(op->arg, status);
	rop_free(op);
}

static struct rop *rop_find(struct rpeer *p, uint64_t id)
{
	pthread_mutex_lock(&p->mu);
	struct rop *op = p->ops;
	while (op && op->id != id)
		op = op->next;
	pthread_mutex_unlock(&p->mu);
	return op;
}

static uint32_t remaining_ms(const struct rop *op)
{
	int64_t left = op->deadline_ns - loop_now_ns();
	return left <= 1000000 ? 1 : (uint32_t)(left / 1000000);
}

static void fill_ctl(struct rop *op, uint32_t j, uint32_t i, enum ctl_op c)
{
	const wire_block_ref *r = &op->b[i].ref;
	xport_append_io *a = &op->ctl[j];
	uint8_t *k = op->keys + (size_t)j * CTL_KEY_LEN;
	a->ref.h = r->h;
	a->ref.h.arena = (uint8_t)(r->h.arena | CTL_FLAG);
	a->ref.layer = r->offset;
	a->ref.token = r->len;
	a->ref.n_tokens = c;
	a->ref.bytes = CTL_KEY_LEN;
	put_le32(k, op->p->token);
	put_le32(k + 4, i);
	put_le64(k + 8, op->id);
	a->k = k;
	a->v = zeros;
	a->status = 0;
}

static void end_cb(void *arg, int status)
{
	struct rop *op = arg;
	/* A GET's bytes are in already: a lost release only delays the unpin until
	 * the server closes. A PUT is published only if its commit was answered. */
	if (op->is_put && !op->err) {
		for (uint32_t j = 0; j < op->n && op->end_idx[j] != UINT32_MAX; j++) {
			int st = status ? status : op->ctl[j].status;
			if (st) {
				op->b[op->end_idx[j]].status = st;
				if (!op->err)
					op->err = st;
			}
		}
	}
	rop_finish(op, op->err);
}

/* Loop thread: every work request of op is done (or will never be posted). */
static void rop_rdma_done(struct rop *op)
{
	struct rpeer *p = op->p;
	uint32_t m = 0;
	for (uint32_t i = 0; i < op->n; i++) {
		/* Entries the server accepted at BEGIN hold a pin or transaction there. */
		if (op->ctl[i].status != 0)
			continue;
		op->end_idx[m] = i;
		m++;
	}
	if (m < op->n)
		op->end_idx[m] = UINT32_MAX;
	if (m == 0 || is_closing(p)) {
		rop_finish(op, op->err);
		return;
	}
	for (uint32_t j = 0; j < m; j++) {
		uint32_t i = op->end_idx[j];
		enum ctl_op c = !op->is_put ? CTL_GET_END : op->b[i].status ? CTL_PUT_ABORT : CTL_PUT_COMMIT;
		fill_ctl(op, j, i, c);
	}
	op->phase = PH_END;
	int rc = xport_append(p->tcp, op->ctl, m, remaining_ms(op), end_cb, op);
	if (rc) {
		if (op->is_put && !op->err)
			op->err = rc;
		rop_finish(op, op->err);
	}
}

static void set_entry_err(struct rop *op, uint32_t i, int st)
{
	op->b[i].status = st;
	if (!op->err)
		op->err = st;
}

/* Loop thread: posts what fits of the ops waiting for send-queue room. */
static void post_pending(struct rpeer *p)
{
	while (p->postq_head) {
		struct rop *op = p->postq_head;
		while (op->next_post < op->n) {
			uint32_t i = op->next_post;
			if (op->ctl[i].status != 0 || op->b[i].status != 0) {
				op->next_post++;
				continue;
			}
			if (p->qp_err) {
				set_entry_err(op, i, p->qp_err);
				op->next_post++;
				continue;
			}
			if (p->wr_out >= p->depth)
				return;
			size_t loff = (size_t)((uint8_t *)op->b[i].buf - (uint8_t *)xrdma_mr_addr(p->mr));
			uint64_t roff = (uint64_t)op->b[i].ref.h.slot * p->slot_bytes + op->b[i].ref.offset;
			int rc = op->is_put ? xrdma_post_write(p->qp, wr_id_of(op, i), loff, roff, op->b[i].ref.len)
					    : xrdma_post_read(p->qp, wr_id_of(op, i), loff, roff, op->b[i].ref.len);
			if (rc) {
				kvm_log(KVM_LOG_WARN, "xport_rdma_post_failed", "id=%llu entry=%u err=\"%s\"",
					(unsigned long long)op->id, i, xrdma_conn_error(p->qp));
				set_entry_err(op, i, rc == -ERANGE ? -ERANGE : -ECONNRESET);
				op->next_post++;
				continue;
			}
			op->next_post++;
			op->wr_out++;
			p->wr_out++;
		}
		p->postq_head = op->qnext;
		if (!p->postq_head)
			p->postq_tail = NULL;
		op->qnext = NULL;
		if (op->wr_out == 0)
			rop_rdma_done(op);
	}
}

static void begin_cb(void *arg, int status)
{
	struct rop *op = arg;
	struct rpeer *p = op->p;
	if (is_closing(p)) {
		rop_finish(op, -ECANCELED);
		return;
	}
	/* A reply carries per-entry codes; a BEGIN that failed as a whole (connection
	 * lost, deadline) has none, and nothing is known to be held for it. */
	bool any = false;
	for (uint32_t i = 0; i < op->n; i++)
		any = any || op->ctl[i].status != 0;
	if (status && !any) {
		for (uint32_t i = 0; i < op->n; i++)
			op->b[i].status = status;
		rop_finish(op, status);
		return;
	}
	for (uint32_t i = 0; i < op->n; i++) {
		op->b[i].status = 0;
		if (op->ctl[i].status)
			set_entry_err(op, i, op->ctl[i].status);
	}
	op->phase = PH_RDMA;
	op->next_post = 0;
	if (p->postq_tail)
		p->postq_tail->qnext = op;
	else
		p->postq_head = op;
	p->postq_tail = op;
	post_pending(p);
}

/* Loop thread: the QP can carry nothing more; fail what waits to be posted. */
static void qp_broken(struct rpeer *p, int why)
{
	if (!p->qp_err) {
		p->qp_err = why;
		kvm_log(KVM_LOG_WARN, "xport_rdma_qp_error", "token=%u err=\"%s\"", p->token, xrdma_conn_error(p->qp));
	}
}

static void on_wc(struct rpeer *p, const struct xrdma_wc *wc)
{
	if (p->wr_out)
		p->wr_out--;
	struct rop *op = rop_find(p, wc->wr_id >> 24);
	uint32_t i = (uint32_t)(wc->wr_id & 0xFFFFFF);
	if (wc->status) {
		/* Any failed work request moves an RC QP to the error state: the later
		 * ones flush. Callers see one clear code for all of it. */
		qp_broken(p, -ECONNRESET);
	}
	if (!op || op->phase != PH_RDMA || i >= op->n)
		return; /* its op timed out or was cancelled meanwhile */
	if (wc->status)
		set_entry_err(op, i, -ECONNRESET);
	op->wr_out--;
	if (op->wr_out == 0 && op->next_post >= op->n)
		rop_rdma_done(op);
}

static void on_cq(struct loop_src *src, uint32_t events)
{
	(void)events;
	struct rpeer *p = (struct rpeer *)((char *)src - offsetof(struct rpeer, src));
	struct xrdma_wc wcs[32];
	for (;;) {
		int n = xrdma_poll(p->qp, wcs, 32, 0);
		if (n <= 0) {
			if (n < 0)
				qp_broken(p, -ECONNRESET);
			break;
		}
		for (int k = 0; k < n; k++)
			on_wc(p, &wcs[k]);
	}
	post_pending(p);
}

/* Loop thread, about every tick: requests past their deadline fail now. Their work
 * requests may still complete later (and land in the caller's registered buffer):
 * the QP is declared broken so that nothing more is posted on it. */
static void on_tick(struct loop_ticker *t, int64_t now)
{
	struct rpeer *p = (struct rpeer *)((char *)t - offsetof(struct rpeer, ticker));
	for (;;) {
		struct rop *late = NULL;
		pthread_mutex_lock(&p->mu);
		for (struct rop *op = p->ops; op; op = op->next)
			if (op->phase == PH_RDMA && now >= op->deadline_ns) {
				late = op;
				break;
			}
		pthread_mutex_unlock(&p->mu);
		if (!late)
			break;
		if (late->wr_out)
			qp_broken(p, -ECONNRESET);
		for (uint32_t i = 0; i < late->n; i++)
			if (late->b[i].status == 0 && late->ctl[i].status == 0)
				late->b[i].status = -ETIMEDOUT;
		rop_finish(late, -ETIMEDOUT);
	}
}

static int rdma_submit(xport_peer *pp, xport_block_io *b, uint32_t n, uint32_t timeout_ms, xport_cb cb, void *arg,
		       bool is_put)
{
	struct rpeer *p = (struct rpeer *)pp;
	if (n == 0 || !b || !cb || n > (1u << 24))
		return -EINVAL;
	uint8_t *lo = xrdma_mr_addr(p->mr), *hi = lo + xrdma_mr_len(p->mr);
	for (uint32_t i = 0; i < n; i++) {
		uint8_t *buf = b[i].buf;
		/* One-sided operations need both ends registered: a buffer outside the
		 * region would be a local protection error that kills the QP. */
		if (b[i].ref.h.arena >= CTL_FLAG || b[i].ref.len == 0 || !buf || buf < lo || buf > hi ||
		    (size_t)(hi - buf) < b[i].ref.len)
			return -EINVAL;
		if (b[i].ref.h.arena != p->arena)
			return -EINVAL;
	}
	int rc = -ENOMEM;
	struct rop *op = calloc(1, sizeof(*op));
	if (!op)
		return -ENOMEM;
	op->ctl = calloc(n, sizeof(*op->ctl));
	op->keys = calloc(n, CTL_KEY_LEN);
	op->end_idx = calloc(n, sizeof(*op->end_idx));
	if (!op->ctl || !op->keys || !op->end_idx)
		goto fail;
	op->p = p;
	op->is_put = is_put;
	op->b = b;
	op->n = n;
	op->cb = cb;
	op->arg = arg;
	op->deadline_ns = loop_now_ns() + (int64_t)timeout_ms * 1000000;
	pthread_mutex_lock(&p->mu);
	if (is_closing(p)) {
		pthread_mutex_unlock(&p->mu);
		rc = -ECANCELED;
		goto fail;
	}
	op->id = ++p->next_id;
	op->next = p->ops;
	if (p->ops)
		p->ops->prev = op;
	p->ops = op;
	pthread_mutex_unlock(&p->mu);
	for (uint32_t i = 0; i < n; i++) {
		fill_ctl(op, i, i, is_put ? CTL_PUT_BEGIN : CTL_GET_BEGIN);
		b[i].status = 0;
		b[i].csum = 0; /* RDMA carries no checksum: the NIC's ICRC covers the bytes */
	}
	rc = xport_append(p->tcp, op->ctl, n, timeout_ms, begin_cb, op);
	if (rc) {
		pthread_mutex_lock(&p->mu);
		ops_unlink(p, op);
		pthread_mutex_unlock(&p->mu);
		goto fail;
	}
	return 0;
fail:
	rop_free(op);
	return rc;
}

static int rdma_get_blocks(xport_peer *pp, xport_block_io *b, uint32_t n, uint32_t t, xport_cb cb, void *arg)
{
	return rdma_submit(pp, b, n, t, cb, arg, false);
}

static int rdma_put_blocks(xport_peer *pp, xport_block_io *b, uint32_t n, uint32_t t, xport_cb cb, void *arg)
{
	return rdma_submit(pp, b, n, t, cb, arg, true);
}

/* ATTEND, APPEND_KV and PING: over the TCP channel, as xport_tcp_ops sends them. */
static int rdma_attend(xport_peer *pp, const wire_shape *s, xport_attend_query *q, uint32_t n, uint32_t t,
		       xport_cb cb, void *arg)
{
	return xport_attend(((struct rpeer *)pp)->tcp, s, q, n, t, cb, arg);
}

static int rdma_append(xport_peer *pp, xport_append_io *a, uint32_t n, uint32_t t, xport_cb cb, void *arg)
{
	for (uint32_t i = 0; i < n; i++)
		if (a[i].ref.h.arena >= CTL_FLAG) /* reserved for the control entries */
			return -EINVAL;
	return xport_append(((struct rpeer *)pp)->tcp, a, n, t, cb, arg);
}

static int rdma_ping(xport_peer *pp, uint32_t t, xport_cb cb, void *arg)
{
	return xport_ping(((struct rpeer *)pp)->tcp, t, cb, arg);
}

struct sync_task {
	struct loop_task t;
	struct rpeer *p;
	int rc;
};

static void attach_fn(struct loop_task *t)
{
	struct sync_task *s = (struct sync_task *)t;
	struct rpeer *p = s->p;
	struct xrdma_wc wc;
	p->src.cb = on_cq;
	p->src.fd = xrdma_conn_fd(p->qp);
	s->rc = loop_add(p->loop, &p->src, EPOLLIN);
	if (s->rc)
		return;
	loop_ticker_add(p->loop, &p->ticker);
	/* Arms the CQs: the descriptor only becomes readable after a poll found none. */
	while (xrdma_poll(p->qp, &wc, 1, 0) > 0)
		;
}

/* Loop thread, from close, before the TCP peer is closed: once the completion
 * channel is off the loop nothing sends END on the TCP peer any more, and the ops
 * waiting for work requests are cancelled. Those still in BEGIN or END are failed
 * by the TCP close that follows (their callbacks see `closing`). */
static void detach_fn(struct loop_task *t)
{
	struct sync_task *s = (struct sync_task *)t;
	struct rpeer *p = s->p;
	__atomic_store_n(&p->closing, true, __ATOMIC_RELEASE);
	loop_ticker_del(p->loop, &p->ticker);
	loop_del(p->loop, &p->src);
	for (;;) {
		pthread_mutex_lock(&p->mu);
		struct rop *op = p->ops;
		while (op && op->phase != PH_RDMA)
			op = op->next;
		pthread_mutex_unlock(&p->mu);
		if (!op)
			break;
		rop_finish(op, -ECANCELED);
	}
}

static void rdma_close(xport_peer *pp)
{
	struct rpeer *p = (struct rpeer *)pp;
	struct sync_task s = {.t.fn = detach_fn, .p = p};
	loop_run_sync(p->loop, &s.t);
	xport_close(p->tcp);
	xrdma_conn_destroy(p->qp);
	pthread_mutex_destroy(&p->mu);
	free(p);
}

int xport_rdma_connect(xport_loop *l, const char *host, uint16_t port, const xport_opts *o,
		       const xport_rdma_cfg *cfg, xport_peer **out)
{
	if (!l || !cfg || !cfg->dev || !cfg->mr || !out)
		return -EINVAL;
	int rc;
	char what[64] = "tcp connect";
	struct rpeer *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	pthread_mutex_init(&p->mu, NULL);
	p->pub.ops = &xport_rdma_ops;
	p->loop = l;
	p->mr = cfg->mr;
	p->depth = cfg->depth ? cfg->depth : DEFAULT_DEPTH;
	p->ticker.fn = on_tick;
	rc = xport_tcp_connect(l, host, port, o, &p->tcp);
	if (rc) {
		kvm_log(KVM_LOG_WARN, "xport_rdma_connect_failed", "host=%s port=%u step=\"%s\" err=\"%s\"", host,
			port, what, strerror(-rc));
		goto clean_p;
	}
	p->pub.remote_node_id = p->tcp->remote_node_id;
	p->pub.remote_caps = p->tcp->remote_caps;
	snprintf(what, sizeof(what), "queue pair");
	rc = xrdma_conn_create(cfg->dev, cfg->mr, p->depth, &p->qp);
	if (rc)
		goto clean_tcp;
	do {
		if (getrandom(&p->token, sizeof(p->token), 0) != sizeof(p->token)) {
			rc = -EIO;
			goto clean_qp;
		}
	} while (p->token == 0);

	/* The exchange: CONNECT carries our description, the GET brings theirs. */
	struct xrdma_peer me, them;
	uint8_t desc[XRDMA_PEER_WIRE_SIZE], info[SRV_INFO_LEN];
	xrdma_conn_local(p->qp, &me);
	xrdma_peer_pack(&me, desc);
	uint32_t tmo = o && o->connect_timeout_ms ? o->connect_timeout_ms : 3000;
	xport_append_io a = {
	        .ref = {.h = {.slot = p->token, .gen = 0, .arena = CTL_ARENA},
	                .n_tokens = CTL_CONNECT,
	                .bytes = XRDMA_PEER_WIRE_SIZE},
	        .k = desc,
	        .v = zeros,
	};
	xport_block_io g = {.ref = {.h = {.slot = p->token, .gen = 0, .arena = CTL_ARENA}, .len = SRV_INFO_LEN},
	                    .buf = info};
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	snprintf(what, sizeof(what), "CONNECT exchange");
	rc = xport_append(p->tcp, &a, 1, tmo, xport_waiter_cb, &w);
	if (rc == 0)
		rc = xport_waiter_wait(&w);
	if (rc == 0)
		rc = a.status;
	if (rc == 0) {
		snprintf(what, sizeof(what), "server description");
		xport_waiter_add(&w, 1);
		rc = xport_get_blocks(p->tcp, &g, 1, tmo, xport_waiter_cb, &w);
		if (rc == 0)
			rc = xport_waiter_wait(&w);
		if (rc == 0)
			rc = g.status;
	}
	xport_waiter_destroy(&w);
	if (rc)
		goto clean_qp;
	rc = xrdma_peer_unpack(&them, info, XRDMA_PEER_WIRE_SIZE);
	if (rc)
		goto clean_qp;
	p->slot_bytes = get_le64(info + 48);
	p->arena = info[56];
	snprintf(what, sizeof(what), "queue pair connect");
	rc = xrdma_conn_connect(p->qp, &them);
	if (rc)
		goto clean_qp;
	struct sync_task s = {.t.fn = attach_fn, .p = p};
	loop_run_sync(l, &s.t);
	rc = s.rc;
	if (rc)
		goto clean_qp;
	kvm_log(KVM_LOG_DEBUG, "xport_rdma_connected", "host=%s port=%u token=%u qpn=%u remote_qpn=%u", host,
		port, p->token, me.qpn, them.qpn);
	*out = &p->pub;
	return 0;

clean_qp:
	kvm_log(KVM_LOG_WARN, "xport_rdma_connect_failed", "host=%s port=%u step=\"%s\" err=\"%s\" reason=\"%s\"",
		host, port, what, strerror(-rc), p->qp ? xrdma_conn_error(p->qp) : "");
	xrdma_conn_destroy(p->qp);
clean_tcp:
	xport_close(p->tcp);
clean_p:
	pthread_mutex_destroy(&p->mu);
	free(p);
	return rc;
}

/* ---- server ------------------------------------------------------------------ */

/* A pin or transaction held for a client between BEGIN and END. */
struct rs_held {
	struct rs_held *next;
	uint64_t seq;
	uint32_t idx;
	bool is_put;
	wire_block_ref ref;
	void *pin; /* GET: the store's pin; PUT: its transaction */
};

struct rs_conn {
	struct rs_conn *next;
	uint32_t token;
	struct xrdma_conn *qp;
	uint8_t info[SRV_INFO_LEN];
	struct rs_held *held;
};

struct rserver {
	xport_server pub;
	xport_server *tcp;
	xport_handlers user;
	void *user_ctx;
	xport_handlers wrap;
	struct xrdma_dev *dev;
	struct xrdma_mr *mr;
	uint64_t slot_bytes;
	uint8_t arena;
	/* loop thread only (every handler runs there) */
	struct rs_conn *conns;
	uint32_t n_conns;
};

/* The pin of the server-description GET, which holds nothing. */
static char info_pin;

static struct rs_conn *rs_find(struct rserver *s, uint32_t token)
{
	struct rs_conn *c = s->conns;
	while (c && c->token != token)
		c = c->next;
	return c;
}

static int w_hello(void *ctx, const wire_hello *h)
{
	struct rserver *s = ctx;
	return s->user.hello ? s->user.hello(s->user_ctx, h) : 0;
}

static int w_get(void *ctx, const wire_block_ref *ref, const void **data, void **pin, uint64_t *csum)
{
	struct rserver *s = ctx;
	if (ref->h.arena == CTL_ARENA) {
		struct rs_conn *c = rs_find(s, ref->h.slot);
		if (!c)
			return -ENOENT;
		if (ref->offset != 0 || ref->len != SRV_INFO_LEN)
			return -ERANGE;
		*data = c->info;
		*pin = &info_pin;
		return 0;
	}
	if (ref->h.arena & CTL_FLAG)
		return -EINVAL;
	if (!s->user.get)
		return -ENOSYS;
	return s->user.get(s->user_ctx, ref, data, pin, csum);
}

static void w_unpin(void *ctx, void *pin)
{
	struct rserver *s = ctx;
	if (pin != &info_pin && s->user.unpin)
		s->user.unpin(s->user_ctx, pin);
}

static int w_put_prepare(void *ctx, const wire_block_ref *ref, void **dst, void **txn)
{
	struct rserver *s = ctx;
	if (ref->h.arena & CTL_FLAG)
		return -EINVAL;
	return s->user.put_prepare ? s->user.put_prepare(s->user_ctx, ref, dst, txn) : -ENOSYS;
}

static int w_put_commit(void *ctx, const wire_block_ref *ref, void *txn, int status, uint64_t csum)
{
	struct rserver *s = ctx;
	return s->user.put_commit ? s->user.put_commit(s->user_ctx, ref, txn, status, csum) : -ENOSYS;
}

static int w_attend(void *ctx, const wire_attend_view *v, const float *q, float *o, float *lse, int *st,
		    xport_attend_token *tok)
{
	struct rserver *s = ctx;
	return s->user.attend ? s->user.attend(s->user_ctx, v, q, o, lse, st, tok) : -ENOSYS;
}

static void held_release(struct rserver *s, struct rs_held *hd, int status)
{
	if (hd->is_put) {
		if (s->user.put_commit)
			s->user.put_commit(s->user_ctx, &hd->ref, hd->pin, status, 0);
	} else if (s->user.unpin) {
		s->user.unpin(s->user_ctx, hd->pin);
	}
	free(hd);
}

static int ctl_connect(struct rserver *s, const wire_append_ref *r, const void *k)
{
	if (r->bytes != XRDMA_PEER_WIRE_SIZE || r->h.slot == 0)
		return -EINVAL;
	if (rs_find(s, r->h.slot))
		return -EBUSY; /* a token already in use: the client draws another */
	if (s->n_conns >= MAX_SRV_CONNS)
		return -ENOMEM;
	struct xrdma_peer them, me;
	int rc = xrdma_peer_unpack(&them, k, XRDMA_PEER_WIRE_SIZE);
	if (rc)
		return rc;
	struct rs_conn *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	rc = xrdma_conn_create(s->dev, s->mr, 4, &c->qp);
	if (rc)
		goto clean_c;
	rc = xrdma_conn_connect(c->qp, &them);
	if (rc)
		goto clean_qp;
	c->token = r->h.slot;
	xrdma_conn_local(c->qp, &me);
	xrdma_peer_pack(&me, c->info);
	put_le64(c->info + 48, s->slot_bytes);
	c->info[56] = s->arena;
	c->next = s->conns;
	s->conns = c;
	s->n_conns++;
	return 0;
clean_qp:
	kvm_log(KVM_LOG_WARN, "xport_rdma_accept_failed", "token=%u reason=\"%s\"", r->h.slot,
		xrdma_conn_error(c->qp));
	xrdma_conn_destroy(c->qp);
clean_c:
	free(c);
	return rc;
}

/* BEGIN: the store checks the handle (generation, range); the pointer it gives must
 * be where the client will read or write, and stays pinned until END. */
static int ctl_begin(struct rserver *s, struct rs_conn *c, const wire_block_ref *ref, uint64_t seq, uint32_t idx,
		     bool is_put)
{
	if (ref->h.arena != s->arena)
		return -ENOENT;
	struct rs_held *hd = calloc(1, sizeof(*hd));
	if (!hd)
		return -ENOMEM;
	void *ptr = NULL;
	int rc;
	if (is_put) {
		rc = s->user.put_prepare ? s->user.put_prepare(s->user_ctx, ref, &ptr, &hd->pin) : -ENOSYS;
	} else {
		const void *d = NULL;
		uint64_t csum = 0;
		rc = s->user.get ? s->user.get(s->user_ctx, ref, &d, &hd->pin, &csum) : -ENOSYS;
		ptr = (void *)d;
	}
	if (rc) {
		free(hd);
		return rc;
	}
	hd->seq = seq;
	hd->idx = idx;
	hd->is_put = is_put;
	hd->ref = *ref;
	uint8_t *want = (uint8_t *)xrdma_mr_addr(s->mr) + (uint64_t)ref->h.slot * s->slot_bytes + ref->offset;
	uint8_t *end = (uint8_t *)xrdma_mr_addr(s->mr) + xrdma_mr_len(s->mr);
	if ((uint8_t *)ptr != want || want > end || (size_t)(end - want) < ref->len) {
		kvm_log(KVM_LOG_WARN, "xport_rdma_block_not_registered", "slot=%u offset=%u len=%u",
			ref->h.slot, ref->offset, ref->len);
		held_release(s, hd, -EFAULT);
		return -EFAULT;
	}
	hd->next = c->held;
	c->held = hd;
	return 0;
}

static int ctl_end(struct rs_conn *c, struct rserver *s, uint64_t seq, uint32_t idx, int status)
{
	for (struct rs_held **pp = &c->held; *pp; pp = &(*pp)->next) {
		struct rs_held *hd = *pp;
		if (hd->seq != seq || hd->idx != idx)
			continue;
		*pp = hd->next;
		int rc = 0;
		if (hd->is_put && s->user.put_commit)
			rc = s->user.put_commit(s->user_ctx, &hd->ref, hd->pin, status, 0);
		else if (!hd->is_put && s->user.unpin)
			s->user.unpin(s->user_ctx, hd->pin);
		free(hd);
		return rc;
	}
	return -ENOENT;
}

static int w_append(void *ctx, const wire_append_ref *r, const void *k, const void *v)
{
	struct rserver *s = ctx;
	(void)v;
	if (!(r->h.arena & CTL_FLAG))
		return s->user.append ? s->user.append(s->user_ctx, r, k, v) : -ENOSYS;
	if (r->n_tokens == CTL_CONNECT)
		return r->h.arena == CTL_ARENA ? ctl_connect(s, r, k) : -EINVAL;
	if (r->bytes != CTL_KEY_LEN)
		return -EINVAL;
	const uint8_t *kb = k;
	struct rs_conn *c = rs_find(s, get_le32(kb));
	if (!c)
		return -ENOTCONN;
	uint32_t idx = get_le32(kb + 4);
	uint64_t seq = get_le64(kb + 8);
	wire_block_ref ref = {.h = r->h, .offset = r->layer, .len = r->token};
	ref.h.arena = (uint8_t)(r->h.arena & ~CTL_FLAG);
	switch (r->n_tokens) {
	case CTL_GET_BEGIN: return ctl_begin(s, c, &ref, seq, idx, false);
	case CTL_PUT_BEGIN: return ctl_begin(s, c, &ref, seq, idx, true);
	case CTL_GET_END: return ctl_end(c, s, seq, idx, 0);
	case CTL_PUT_COMMIT: return ctl_end(c, s, seq, idx, 0);
	case CTL_PUT_ABORT: return ctl_end(c, s, seq, idx, -ECONNRESET);
	default: return -EINVAL;
	}
}

int xport_rdma_listen(xport_loop *l, const char *host, uint16_t port, const xport_opts *o,
		      const xport_rdma_cfg *cfg, const xport_handlers *h, void *ctx, xport_server **out)
{
	if (!l || !cfg || !cfg->dev || !cfg->mr || !h || !out || cfg->arena >= CTL_FLAG || cfg->slot_bytes == 0)
		return -EINVAL;
	struct rserver *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->pub.ops = &xport_rdma_ops;
	s->user = *h;
	s->user_ctx = ctx;
	s->dev = cfg->dev;
	s->mr = cfg->mr;
	s->slot_bytes = cfg->slot_bytes;
	s->arena = cfg->arena;
	s->wrap = (xport_handlers){
	        .hello = w_hello,
	        .get = w_get,
	        .unpin = w_unpin,
	        .put_prepare = w_put_prepare,
	        .put_commit = w_put_commit,
	        .attend = h->attend ? w_attend : NULL,
	        .append = w_append,
	};
	int rc = xport_tcp_listen(l, host, port, o, &s->wrap, s, &s->tcp);
	if (rc) {
		free(s);
		return rc;
	}
	s->pub.port = s->tcp->port;
	*out = &s->pub;
	return 0;
}

static void rdma_server_close(xport_server *ss)
{
	struct rserver *s = (struct rserver *)ss;
	/* After this no handler runs, so the connection table is ours. */
	xport_server_close(s->tcp);
	while (s->conns) {
		struct rs_conn *c = s->conns;
		s->conns = c->next;
		while (c->held) {
			struct rs_held *hd = c->held;
			c->held = hd->next;
			held_release(s, hd, -ECONNRESET);
		}
		xrdma_conn_destroy(c->qp);
		free(c);
	}
	free(s);
}

static void rdma_server_stats(xport_server *ss, xport_stats *out)
{
	xport_server_stats(((struct rserver *)ss)->tcp, out);
}

/* The generic entries cannot carry the verbs objects: use xport_rdma_connect and
 * xport_rdma_listen. */
static int rdma_connect_nocfg(xport_loop *l, const char *host, uint16_t port, const xport_opts *o,
			      xport_peer **out)
{
	(void)l, (void)host, (void)port, (void)o, (void)out;
	return -EINVAL;
}

static int rdma_listen_nocfg(xport_loop *l, const char *host, uint16_t port, const xport_opts *o,
			     const xport_handlers *h, void *ctx, xport_server **out)
{
	(void)l, (void)host, (void)port, (void)o, (void)h, (void)ctx, (void)out;
	return -EINVAL;
}

const struct xport_ops xport_rdma_ops = {
        .name = "rdma",
        .connect = rdma_connect_nocfg,
        .close = rdma_close,
        .get_blocks = rdma_get_blocks,
        .put_blocks = rdma_put_blocks,
        .attend = rdma_attend,
        .append = rdma_append,
        .ping = rdma_ping,
        .listen = rdma_listen_nocfg,
        .server_close = rdma_server_close,
        .server_stats = rdma_server_stats,
};
