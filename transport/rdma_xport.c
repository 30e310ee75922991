/* The RDMA backend of the data plane: one-sided READ for GET_BLOCKS, WRITE for
 * PUT_BLOCKS, SEND/RECV messages for ATTEND, APPEND_KV and PING (see "SEND/RECV
 * messages" below), the rest (set-up, control entries, frames too large for a
 * message) over an inner TCP peer (xport_tcp_ops).
 *
 * Why a TCP peer inside: the queue pair is set up over the TCP channel anyway, the
 * server must check every handle before its bytes are read (generations live in
 * the store, not in the registered bytes), and frames too large for a message
 * still need it. So a one-sided request is three steps, each visible in docs/rdma.md:
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
#include <sys/uio.h>

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

/* ---- SEND/RECV messages: ATTEND, APPEND_KV, PING -------------------------------
 *
 * Each side registers its own message region (not the arena): MSG_N receive slots
 * of MSG_SLOT bytes, all posted from the start, then its send slots. A message is
 * one whole wire frame (header, metadata, bulk, both checksums), exactly as on TCP.
 * The client keeps at most MSG_N requests unanswered (credits), so every reply
 * finds a posted receive; a frame, or the reply it expects, larger than a slot goes
 * over the TCP channel instead (docs/rdma.md). Work-request ids of messages have
 * MSG_WR set, bit 32 for a send, and the slot in the low bits. */
#define MSG_SLOT (128u * 1024)
#define MSG_N 16u
#define MSG_WR (1ull << 63)
#define MSG_WR_SEND (1ull << 32)

struct msg_ring {
	struct xrdma_mr *mr;
	uint8_t *buf;
	uint32_t n_send;
	uint32_t *free_send; /* stack of free send slots */
	uint32_t n_free;
};

static int ring_init(struct msg_ring *r, struct xrdma_dev *dev, uint32_t n_send)
{
	size_t len = (size_t)(MSG_N + n_send) * MSG_SLOT;
	r->buf = aligned_alloc(4096, len);
	r->free_send = calloc(n_send, sizeof(uint32_t));
	if (!r->buf || !r->free_send)
		return -ENOMEM;
	memset(r->buf, 0, len);
	int rc = xrdma_mr_reg(dev, r->buf, len, &r->mr);
	if (rc)
		return rc;
	r->n_send = n_send;
	for (uint32_t i = 0; i < n_send; i++)
		r->free_send[r->n_free++] = n_send - 1 - i;
	return 0;
}

static void ring_free(struct msg_ring *r)
{
	xrdma_mr_dereg(r->mr);
	free(r->buf);
	free(r->free_send);
	memset(r, 0, sizeof(*r));
}

static int ring_post_recv(struct msg_ring *r, struct xrdma_conn *qp, uint32_t slot)
{
	return xrdma_post_recv_in(qp, r->mr, MSG_WR | slot, (size_t)slot * MSG_SLOT, MSG_SLOT);
}

/* Copies frame into a free send slot and posts it: 0, -EAGAIN (no slot free) or
 * the verbs' code. */
static int ring_send(struct msg_ring *r, struct xrdma_conn *qp, const uint8_t *frame, uint32_t len)
{
	if (r->n_free == 0)
		return -EAGAIN;
	uint32_t s = r->free_send[--r->n_free];
	size_t off = (size_t)(MSG_N + s) * MSG_SLOT;
	memcpy(r->buf + off, frame, len);
	int rc = xrdma_post_send_in(qp, r->mr, MSG_WR | MSG_WR_SEND | s, off, len);
	if (rc)
		r->free_send[r->n_free++] = s;
	return rc;
}

static void ring_send_done(struct msg_ring *r, uint64_t wr_id)
{
	if (r->n_free < r->n_send)
		r->free_send[r->n_free++] = (uint32_t)(wr_id & 0xFFFFFFFFu);
}

/* A whole frame in one malloc'd buffer: header, meta (meta_len bytes, already
 * encoded by the caller at frame + WIRE_HDR_LEN), then the bulk segments copied
 * in; both checksums. Returns the frame length. */
static uint32_t frame_seal(uint8_t *frame, uint8_t op, uint16_t flags, uint64_t id, uint32_t meta_len,
			   const struct iovec *bulk, int nbulk, bool csum)
{
	uint64_t blen = 0;
	uint8_t *p = frame + WIRE_HDR_LEN + meta_len;
	for (int i = 0; i < nbulk; i++) {
		memcpy(p, bulk[i].iov_base, bulk[i].iov_len);
		p += bulk[i].iov_len;
		blen += bulk[i].iov_len;
	}
	wire_header h = {.magic = WIRE_MAGIC, .version = WIRE_VERSION, .opcode = op, .flags = flags,
	                 .req_id = id, .meta_len = meta_len, .bulk_len = (uint32_t)blen};
	if (blen && !csum) {
		h.flags |= WIRE_F_BULK_NOCSUM;
	} else if (blen) {
		struct iovec one = {frame + WIRE_HDR_LEN + meta_len, blen};
		uint64_t x = wire_csum_iov(&one, 1);
		h.bulk_csum = wire_csum_combine(&x, 1);
	}
	wire_encode_header(&h, frame);
	h.meta_csum = wire_csum_meta(frame, frame + WIRE_HDR_LEN, meta_len);
	wire_encode_header(&h, frame);
	return (uint32_t)(WIRE_HDR_LEN + meta_len + blen);
}

/* Checks a received frame as the TCP backend does: header and limits, that it is
 * exactly len bytes, both checksums. */
static int frame_check(const uint8_t *f, uint32_t len, const wire_limits *lim, wire_header *h)
{
	if (len < WIRE_HDR_LEN)
		return -EPROTO;
	int rc = wire_decode_header(f, lim, h);
	if (rc)
		return rc;
	if ((uint64_t)WIRE_HDR_LEN + h->meta_len + h->bulk_len != len)
		return -EPROTO;
	if (wire_csum_meta(f, f + WIRE_HDR_LEN, h->meta_len) != h->meta_csum)
		return -EBADMSG;
	if (h->bulk_len && !(h->flags & WIRE_F_BULK_NOCSUM)) {
		struct iovec one = {(void *)(f + WIRE_HDR_LEN + h->meta_len), h->bulk_len};
		uint64_t x = wire_csum_iov(&one, 1);
		if (wire_csum_combine(&x, 1) != h->bulk_csum)
			return -EBADMSG;
	}
	return 0;
}


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
	/* messages (loop thread only, but next_msg_id, limits and bulk_csum) */
	struct msg_ring ring;
	struct mreq *mreqs, *mq_head, *mq_tail;
	uint32_t credits; /* requests that may still be sent: our posted receives */
	uint64_t next_msg_id;
	wire_limits limits;
	bool bulk_csum;
	bool probe_out;     /* a liveness PING is out on the TCP channel */
	int64_t last_probe; /* when it was sent */
};

static void msg_fail_all(struct rpeer *p, int why);

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
	msg_fail_all(p, p->qp_err);
}

/* A request sent as a message. Created on the submitting thread, handed to the
 * loop thread by its task; from then on loop-thread only. */
struct mreq {
	struct loop_task task;
	struct mreq *next, *prev; /* p->mreqs: every request not yet finished */
	struct mreq *qnext;       /* p->mq: waiting for a credit and a send slot */
	struct rpeer *p;
	uint64_t id;
	uint8_t op;
	void *items;
	uint32_t n;
	wire_shape shape;
	int64_t deadline_ns;
	xport_cb cb;
	void *arg;
	uint8_t *frame; /* freed once sent */
	uint32_t len;
};

static void mreq_finish(struct mreq *r, int status)
{
	struct rpeer *p = r->p;
	if (r->prev)
		r->prev->next = r->next;
	else
		p->mreqs = r->next;
	if (r->next)
		r->next->prev = r->prev;
	if (r->frame) { /* still waiting in p->mq */
		struct mreq **pp = &p->mq_head, *prev = NULL;
		while (*pp && *pp != r) {
			prev = *pp;
			pp = &(*pp)->qnext;
		}
		if (*pp) {
			*pp = r->qnext;
			if (p->mq_tail == r)
				p->mq_tail = prev;
		}
	}
	if (status)
		kvm_log(KVM_LOG_DEBUG, "xport_rdma_req_failed", "op=%s id=%llu err=\"%s\"", wire_op_name(r->op),
			(unsigned long long)r->id, strerror(-status));
	r->cb(r->arg, status);
	free(r->frame);
	free(r);
}

/* Loop thread: the QP can carry no message any more; every request fails. */
static void msg_fail_all(struct rpeer *p, int why)
{
	while (p->mreqs)
		mreq_finish(p->mreqs, why);
}

static void msg_pump(struct rpeer *p)
{
	while (p->mq_head) {
		struct mreq *r = p->mq_head;
		if (p->qp_err) {
			mreq_finish(r, p->qp_err);
			continue;
		}
		if (p->credits == 0 || p->ring.n_free == 0)
			return;
		int rc = ring_send(&p->ring, p->qp, r->frame, r->len);
		p->mq_head = r->qnext;
		if (!p->mq_head)
			p->mq_tail = NULL;
		r->qnext = NULL;
		free(r->frame);
		r->frame = NULL;
		if (rc) {
			kvm_log(KVM_LOG_WARN, "xport_rdma_post_failed", "id=%llu op=%s err=\"%s\"",
				(unsigned long long)r->id, wire_op_name(r->op), xrdma_conn_error(p->qp));
			mreq_finish(r, -ECONNRESET);
			continue;
		}
		p->credits--;
	}
}

static void mreq_start(struct loop_task *t)
{
	struct mreq *r = (struct mreq *)t;
	struct rpeer *p = r->p;
	r->next = p->mreqs;
	if (p->mreqs)
		p->mreqs->prev = r;
	p->mreqs = r;
	if (p->mq_tail)
		p->mq_tail->qnext = r;
	else
		p->mq_head = r;
	p->mq_tail = r;
	msg_pump(p);
}

/* Loop thread: a reply arrived in receive slot `slot`. */
static int msg_reply(struct rpeer *p, const uint8_t *f, uint32_t len)
{
	wire_header h;
	int rc = frame_check(f, len, &p->limits, &h);
	if (rc || !(h.flags & WIRE_F_REPLY)) {
		kvm_log(KVM_LOG_WARN, "xport_rdma_bad_reply", "token=%u len=%u err=\"%s\"", p->token, len,
			strerror(rc ? -rc : EPROTO));
		return rc ? rc : -EPROTO;
	}
	struct mreq *r = p->mreqs;
	while (r && (r->id != h.req_id || r->frame))
		r = r->next;
	if (!r)
		return 0; /* timed out meanwhile: dropped */
	const uint8_t *m = f + WIRE_HDR_LEN, *bulk = m + h.meta_len;
	if (h.opcode == WIRE_OP_ERROR) {
		uint32_t code, ml;
		const char *msg;
		if (wire_decode_error(m, h.meta_len, &p->limits, &code, &msg, &ml))
			return -EPROTO;
		kvm_log(KVM_LOG_WARN, "xport_remote_error", "token=%u id=%llu code=%u msg=\"%.*s\"", p->token,
			(unsigned long long)h.req_id, code, (int)ml, msg);
		mreq_finish(r, wire_err_to_errno(code) ? wire_err_to_errno(code) : -EPROTO);
		return 0;
	}
	if (h.opcode != r->op)
		return -EPROTO;
	if (r->op == WIRE_OP_PING) {
		int32_t st;
		uint64_t stamp;
		if (h.bulk_len || wire_decode_ping(m, h.meta_len, 1, &st, &stamp))
			return -EPROTO;
		mreq_finish(r, wire_err_to_errno((uint32_t)st));
		return 0;
	}
	wire_status_view sv;
	if (wire_decode_status_reply(m, h.meta_len, &p->limits, &sv) || sv.n != (sv.status ? sv.n : r->n))
		return -EPROTO;
	if (sv.status) {
		if (h.bulk_len)
			return -EPROTO;
		mreq_finish(r, wire_err_to_errno(sv.status));
		return 0;
	}
	if (r->op == WIRE_OP_APPEND_KV) {
		xport_append_io *a = r->items;
		if (h.bulk_len)
			return -EPROTO;
		for (uint32_t i = 0; i < r->n; i++)
			a[i].status = wire_err_to_errno(wire_status_at(&sv, i));
	} else {
		xport_attend_query *q = r->items;
		size_t ob = (size_t)r->shape.q_heads * r->shape.head_dim * 4, lb = (size_t)r->shape.q_heads * 4;
		if (h.bulk_len != (uint64_t)r->n * (ob + lb))
			return -EPROTO;
		/* Every query's o, then every query's lse (as the TCP backend sends them). */
		for (uint32_t i = 0; i < r->n; i++) {
			q[i].status = wire_err_to_errno(wire_status_at(&sv, i));
			memcpy(q[i].o, bulk + i * ob, ob);
			memcpy(q[i].lse, bulk + r->n * ob + i * lb, lb);
		}
	}
	mreq_finish(r, 0);
	return 0;
}

static void msg_wc(struct rpeer *p, const struct xrdma_wc *wc)
{
	if (wc->wr_id & MSG_WR_SEND) {
		ring_send_done(&p->ring, wc->wr_id);
	} else if (wc->status == 0) {
		uint32_t slot = (uint32_t)(wc->wr_id & 0xFFFFFFFFu);
		p->credits++; /* every reply used one of our receives */
		int rc = msg_reply(p, p->ring.buf + (size_t)slot * MSG_SLOT, wc->byte_len);
		if (rc == 0 && !p->qp_err)
			rc = ring_post_recv(&p->ring, p->qp, slot);
		if (rc)
			qp_broken(p, -ECONNRESET); /* a peer that breaks the protocol is not trusted further */
	}
	if (wc->status)
		qp_broken(p, -ECONNRESET);
}

/* Builds the frame and hands it to the loop. -E2BIG: larger than a message slot
 * (or its reply would be): the caller sends it over TCP. */
static int msg_submit(struct rpeer *p, uint8_t op, void *items, uint32_t n, const wire_shape *s, size_t meta_cap,
		      const struct iovec *bulk, int nbulk, uint64_t reply_len, uint32_t timeout_ms, xport_cb cb,
		      void *arg, int (*encode)(wire_buf *b, const void *items, uint32_t n, const wire_shape *s))
{
	uint64_t blen = 0;
	for (int i = 0; i < nbulk; i++)
		blen += bulk[i].iov_len;
	if (WIRE_HDR_LEN + meta_cap + blen > MSG_SLOT || reply_len > MSG_SLOT)
		return -E2BIG;
	if (blen > p->limits.max_bulk || meta_cap > p->limits.max_meta)
		return -EMSGSIZE;
	struct mreq *r = calloc(1, sizeof(*r));
	uint8_t *f = malloc(WIRE_HDR_LEN + meta_cap + blen);
	if (!r || !f) {
		free(r);
		free(f);
		return -ENOMEM;
	}
	wire_buf wb = {.p = f + WIRE_HDR_LEN, .cap = meta_cap};
	int rc = encode(&wb, items, n, s);
	if (!rc)
		rc = wb.err;
	/* Refuse here what the server's decoder would refuse, as the TCP backend does. */
	if (!rc && op == WIRE_OP_ATTEND) {
		wire_attend_view v;
		rc = wire_decode_attend_req(f + WIRE_HDR_LEN, wb.len, (uint32_t)blen, &p->limits, &v);
	} else if (!rc && op == WIRE_OP_APPEND_KV) {
		wire_append_view v;
		rc = wire_decode_append_req(f + WIRE_HDR_LEN, wb.len, (uint32_t)blen, &p->limits, &v);
	}
	if (rc) {
		free(r);
		free(f);
		return rc == -EPROTO ? -EINVAL : rc;
	}
	r->task.fn = mreq_start;
	r->p = p;
	r->id = __atomic_add_fetch(&p->next_msg_id, 1, __ATOMIC_RELAXED);
	r->op = op;
	r->items = items;
	r->n = n;
	if (s)
		r->shape = *s;
	r->deadline_ns = loop_now_ns() + (int64_t)(timeout_ms ? timeout_ms : 30000) * 1000000;
	r->cb = cb;
	r->arg = arg;
	r->frame = f;
	r->len = frame_seal(f, op, 0, r->id, (uint32_t)wb.len, bulk, nbulk, p->bulk_csum);
	if (is_closing(p)) {
		free(f);
		free(r);
		return -ECANCELED;
	}
	loop_post(p->loop, &r->task);
	return 0;
}

static int enc_attend(wire_buf *b, const void *items, uint32_t n, const wire_shape *s)
{
	const xport_attend_query *q = items;
	wire_encode_attend_begin(b, s, n);
	for (uint32_t i = 0; i < n; i++)
		wire_encode_attend_query(b, q[i].n_tokens, q[i].blocks, q[i].n_blocks);
	return 0;
}

static int enc_append(wire_buf *b, const void *items, uint32_t n, const wire_shape *s)
{
	(void)s;
	const xport_append_io *a = items;
	wire_put_u32(b, n);
	wire_put_u32(b, 0);
	for (uint32_t i = 0; i < n; i++) {
		wire_put_handle(b, &a[i].ref.h);
		wire_put_u32(b, a[i].ref.layer);
		wire_put_u32(b, a[i].ref.token);
		wire_put_u32(b, a[i].ref.n_tokens);
		wire_put_u32(b, a[i].ref.bytes);
	}
	return 0;
}

static int enc_ping(wire_buf *b, const void *items, uint32_t n, const wire_shape *s)
{
	(void)items, (void)n, (void)s;
	return wire_encode_ping(b, 0, (uint64_t)loop_now_ns());
}

/* ATTEND, APPEND_KV and PING: SEND/RECV messages on the queue pair; a frame larger
 * than a message slot (or whose reply would be) goes over the TCP channel. */
static int rdma_attend(xport_peer *pp, const wire_shape *s, xport_attend_query *q, uint32_t n, uint32_t t,
		       xport_cb cb, void *arg)
{
	struct rpeer *p = (struct rpeer *)pp;
	if (!s || !q || n == 0 || !cb || s->q_heads == 0 || s->head_dim == 0)
		return -EINVAL;
	if (n > p->limits.max_queries)
		return -EMSGSIZE;
	uint64_t handles = 0;
	for (uint32_t i = 0; i < n; i++) {
		if (!q[i].q || !q[i].o || !q[i].lse || (q[i].n_blocks && !q[i].blocks))
			return -EINVAL;
		handles += q[i].n_blocks;
	}
	if (handles > p->limits.max_blocks)
		return -EMSGSIZE;
	size_t qb = (size_t)s->q_heads * s->head_dim * 4;
	uint64_t rb = WIRE_HDR_LEN + wire_status_reply_size(n) + wire_attend_reply_bulk(s, n);
	size_t ml = wire_attend_req_size(n, (uint32_t)handles);
	int rc = -E2BIG;
	if (n <= MSG_SLOT / sizeof(struct iovec)) {
		struct iovec *iov = calloc(n, sizeof(*iov));
		if (!iov)
			return -ENOMEM;
		for (uint32_t i = 0; i < n; i++)
			iov[i] = (struct iovec){(void *)q[i].q, qb};
		rc = msg_submit(p, WIRE_OP_ATTEND, q, n, s, ml, iov, (int)n, rb, t, cb, arg, enc_attend);
		free(iov);
	}
	return rc == -E2BIG ? xport_attend(p->tcp, s, q, n, t, cb, arg) : rc;
}

static int rdma_append(xport_peer *pp, xport_append_io *a, uint32_t n, uint32_t t, xport_cb cb, void *arg)
{
	struct rpeer *p = (struct rpeer *)pp;
	if (!a || n == 0 || !cb)
		return -EINVAL;
	if (n > p->limits.max_blocks)
		return -EMSGSIZE;
	for (uint32_t i = 0; i < n; i++) {
		if (a[i].ref.h.arena >= CTL_FLAG) /* reserved for the control entries */
			return -EINVAL;
		if (!a[i].k || !a[i].v || !a[i].ref.bytes || !a[i].ref.n_tokens)
			return -EINVAL;
	}
	int rc = -E2BIG;
	if (n <= MSG_SLOT / 2 / sizeof(struct iovec)) {
		struct iovec *iov = calloc(2 * (size_t)n, sizeof(*iov));
		if (!iov)
			return -ENOMEM;
		for (uint32_t i = 0; i < n; i++) {
			iov[2 * i] = (struct iovec){(void *)a[i].k, a[i].ref.bytes};
			iov[2 * i + 1] = (struct iovec){(void *)a[i].v, a[i].ref.bytes};
		}
		uint64_t rb = WIRE_HDR_LEN + wire_status_reply_size(n);
		rc = msg_submit(p, WIRE_OP_APPEND_KV, a, n, NULL, wire_append_req_size(n), iov, (int)(2 * n), rb, t, cb,
				arg, enc_append);
		free(iov);
	}
	return rc == -E2BIG ? xport_append(p->tcp, a, n, t, cb, arg) : rc;
}

static int rdma_ping(xport_peer *pp, uint32_t t, xport_cb cb, void *arg)
{
	if (!cb)
		return -EINVAL;
	return msg_submit((struct rpeer *)pp, WIRE_OP_PING, NULL, 0, NULL, 8, NULL, 0, WIRE_HDR_LEN + 12, t, cb, arg,
			  enc_ping);
}

static void on_wc(struct rpeer *p, const struct xrdma_wc *wc)
{
	if (wc->wr_id & MSG_WR) {
		msg_wc(p, wc);
		return;
	}
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
	msg_pump(p); /* replies returned credits, send completions freed slots */
}

#define PROBE_MS 500

static void probe_cb(void *arg, int status)
{
	struct rpeer *p = arg;
	p->probe_out = false;
	if (is_closing(p))
		return;
	if (status == -ECONNRESET || status == -ENOTCONN || status == -EPIPE || status == -ECONNREFUSED) {
		kvm_log(KVM_LOG_WARN, "xport_rdma_peer_gone", "token=%u err=\"%s\"", p->token, strerror(-status));
		qp_broken(p, -ECONNRESET);
	}
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
	for (struct mreq *r = p->mreqs, *nx; r; r = nx) {
		nx = r->next;
		if (now >= r->deadline_ns)
			mreq_finish(r, -ETIMEDOUT);
	}
	/* A request whose SEND was acknowledged gets no completion if the server dies
	 * before it replies: while requests wait for replies, a PING on the TCP channel
	 * every PROBE_MS tells a dead server (connection reset or closed) from a slow one. */
	if (p->mreqs && p->credits < MSG_N && !p->probe_out && !p->qp_err && now - p->last_probe >= PROBE_MS * 1000000) {
		p->probe_out = true;
		p->last_probe = now;
		if (xport_ping(p->tcp, 2 * PROBE_MS, probe_cb, p)) {
			p->probe_out = false;
			qp_broken(p, -ECONNRESET);
		}
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
	msg_fail_all(p, -ECANCELED);
}

static void rdma_close(xport_peer *pp)
{
	struct rpeer *p = (struct rpeer *)pp;
	struct sync_task s = {.t.fn = detach_fn, .p = p};
	loop_run_sync(p->loop, &s.t);
	xport_close(p->tcp);
	xrdma_conn_destroy(p->qp);
	ring_free(&p->ring);
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
	if (o) {
		p->limits = o->limits;
		p->bulk_csum = o->bulk_checksum != 0;
	} else {
		wire_limits_default(&p->limits);
		p->bulk_csum = true;
	}
	rc = xport_tcp_connect(l, host, port, o, &p->tcp);
	if (rc) {
		kvm_log(KVM_LOG_WARN, "xport_rdma_connect_failed", "host=%s port=%u step=\"%s\" err=\"%s\"", host,
			port, what, strerror(-rc));
		goto clean_p;
	}
	p->pub.remote_node_id = p->tcp->remote_node_id;
	p->pub.remote_caps = p->tcp->remote_caps;
	snprintf(what, sizeof(what), "queue pair");
	rc = xrdma_conn_create(cfg->dev, cfg->mr, p->depth + MSG_N, &p->qp);
	if (rc)
		goto clean_tcp;
	snprintf(what, sizeof(what), "message ring");
	rc = ring_init(&p->ring, cfg->dev, MSG_N);
	if (rc)
		goto clean_qp;
	p->credits = MSG_N;
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
	/* rxe refuses receives before INIT; none of ours can be needed before now. */
	for (uint32_t i = 0; rc == 0 && i < MSG_N; i++)
		rc = ring_post_recv(&p->ring, p->qp, i);
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
	ring_free(&p->ring);
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
	struct rserver *srv;
	uint32_t token;
	struct xrdma_conn *qp;
	uint8_t info[SRV_INFO_LEN];
	struct rs_held *held;
	/* messages */
	struct msg_ring ring;
	struct loop_src src; /* the completion channel */
	struct rmsg *txq, *txq_tail; /* replies waiting for a send slot */
	struct xport_rdma_tok *deferred;
	bool qp_dead;
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
	xport_loop *loop;
	wire_limits lim;
	bool bulk_csum;
	/* loop thread only (every handler runs there) */
	struct rs_conn *conns;
	uint32_t n_conns;
};

/* ---- server: messages ---------------------------------------------------------- */

/* A deferred ATTEND received as a message: owns the request frame (the view
 * points into it), the output and the statuses until xport_attend_complete. */
struct xport_rdma_tok {
	struct attend_tok_base b; /* first: xport_attend_complete reads it */
	struct xport_rdma_tok *next, *prev;
	struct rs_conn *c; /* NULL once the connection is gone */
	wire_attend_view view;
	uint64_t req_id;
	uint8_t *frame;
	float *out;
	uint64_t out_bytes;
	int *st;
};

struct rmsg {
	struct rmsg *next;
	uint32_t len;
	uint8_t f[];
};

/* Loop thread: sends what waits while send slots are free. */
static void rs_pump(struct rs_conn *c)
{
	while (c->txq) {
		struct rmsg *m = c->txq;
		if (!c->qp_dead) {
			int rc = ring_send(&c->ring, c->qp, m->f, m->len);
			if (rc == -EAGAIN)
				return;
			if (rc) {
				kvm_log(KVM_LOG_WARN, "xport_rdma_reply_lost", "token=%u err=\"%s\"", c->token,
					xrdma_conn_error(c->qp));
				c->qp_dead = true;
			}
		}
		c->txq = m->next;
		if (!c->txq)
			c->txq_tail = NULL;
		free(m);
	}
}

/* Queues a reply: header + meta (meta_len bytes encoded by fill) + bulk. */
static void rs_reply(struct rs_conn *c, uint8_t op, uint64_t id, const uint8_t *meta, uint32_t meta_len,
		     const void *bulk, uint64_t bulk_len)
{
	if ((uint64_t)WIRE_HDR_LEN + meta_len + bulk_len > MSG_SLOT) {
		/* The client sends over TCP what would not fit; a reply this large
		 * means a broken client: it gets an error, not a truncated frame. */
		uint8_t em[64];
		wire_buf wb = {.p = em, .cap = sizeof(em)};
		wire_encode_error(&wb, wire_err_from_errno(-EMSGSIZE), "reply larger than a message slot", &c->srv->lim);
		rs_reply(c, WIRE_OP_ERROR, id, em, (uint32_t)wb.len, NULL, 0);
		return;
	}
	struct rmsg *m = malloc(sizeof(*m) + WIRE_HDR_LEN + meta_len + bulk_len);
	if (!m)
		return; /* the client's deadline ends it */
	m->next = NULL;
	memcpy(m->f + WIRE_HDR_LEN, meta, meta_len);
	struct iovec one = {(void *)bulk, bulk_len};
	m->len = frame_seal(m->f, op, WIRE_F_REPLY, id, meta_len, &one, bulk_len ? 1 : 0, c->srv->bulk_csum);
	if (c->txq_tail)
		c->txq_tail->next = m;
	else
		c->txq = m;
	c->txq_tail = m;
	rs_pump(c);
}

static void rs_error(struct rs_conn *c, uint64_t id, int err, const char *msg)
{
	uint8_t em[128];
	wire_buf wb = {.p = em, .cap = sizeof(em)};
	wire_encode_error(&wb, wire_err_from_errno(err), msg, &c->srv->lim);
	kvm_log(KVM_LOG_WARN, "xport_rdma_reject", "token=%u id=%llu err=\"%s\" why=\"%s\"", c->token,
		(unsigned long long)id, strerror(-err), msg);
	rs_reply(c, WIRE_OP_ERROR, id, em, (uint32_t)wb.len, NULL, 0);
}

static void rs_status_reply(struct rs_conn *c, uint8_t op, uint64_t id, int rc, const int *st, uint32_t n,
			    const void *bulk, uint64_t bulk_len)
{
	size_t ml = wire_status_reply_size(n);
	uint8_t *meta = malloc(ml);
	if (!meta)
		return;
	wire_buf wb = {.p = meta, .cap = ml};
	wire_put_u32(&wb, wire_err_from_errno(rc < 0 ? rc : 0));
	wire_put_u32(&wb, rc < 0 ? 0 : n);
	for (uint32_t i = 0; rc >= 0 && i < n; i++)
		wire_put_u32(&wb, wire_err_from_errno(st[i]));
	rs_reply(c, op, id, meta, (uint32_t)wb.len, rc < 0 ? NULL : bulk, rc < 0 ? 0 : bulk_len);
	free(meta);
}

static void rtok_free(struct xport_rdma_tok *t)
{
	free(t->frame);
	free(t->out);
	free(t->st);
	free(t);
}

/* Loop thread: a deferred ATTEND finished. */
static void rtok_done(struct loop_task *task)
{
	struct xport_rdma_tok *t = (struct xport_rdma_tok *)task;
	struct rs_conn *c = t->c;
	if (c) {
		if (t->prev)
			t->prev->next = t->next;
		else
			c->deferred = t->next;
		if (t->next)
			t->next->prev = t->prev;
		rs_status_reply(c, WIRE_OP_ATTEND, t->req_id, t->b.rc, t->st, t->view.n_queries, t->out, t->out_bytes);
	}
	rtok_free(t);
}

/* Loop thread: one request frame, copied out of its receive slot (f is ours). */
static void rs_request(struct rs_conn *c, uint8_t *f, uint32_t len)
{
	struct rserver *s = c->srv;
	wire_header h;
	int rc = frame_check(f, len, &s->lim, &h);
	if (rc == 0 && (h.flags & WIRE_F_REPLY))
		rc = -EPROTO;
	if (rc) {
		uint64_t id = len >= WIRE_HDR_LEN ? get_le64(f + 8) : 0;
		rs_error(c, id, rc, rc == -EBADMSG ? "checksum mismatch" : "bad frame");
		free(f);
		return;
	}
	const uint8_t *m = f + WIRE_HDR_LEN, *bulk = m + h.meta_len;
	switch (h.opcode) {
	case WIRE_OP_PING: {
		int32_t st;
		uint64_t stamp;
		uint8_t pm[12];
		wire_buf wb = {.p = pm, .cap = sizeof(pm)};
		if (wire_decode_ping(m, h.meta_len, 0, &st, &stamp)) {
			rs_error(c, h.req_id, -EPROTO, "bad PING");
			break;
		}
		wire_encode_ping(&wb, 1, stamp);
		rs_reply(c, WIRE_OP_PING, h.req_id, pm, (uint32_t)wb.len, NULL, 0);
		break;
	}
	case WIRE_OP_APPEND_KV: {
		wire_append_view v;
		if (wire_decode_append_req(m, h.meta_len, h.bulk_len, &s->lim, &v)) {
			rs_error(c, h.req_id, -EPROTO, "bad APPEND_KV");
			break;
		}
		int *st = calloc(v.n, sizeof(*st));
		if (!st) {
			rs_error(c, h.req_id, -ENOMEM, "out of memory");
			break;
		}
		size_t off = 0;
		for (uint32_t i = 0; i < v.n; i++) {
			wire_append_ref r;
			wire_append_at(&v, i, &r);
			/* Control entries belong to the TCP channel only. */
			st[i] = r.h.arena & CTL_FLAG ? -EINVAL
			        : s->user.append     ? s->user.append(s->user_ctx, &r, bulk + off, bulk + off + r.bytes)
			                             : -ENOSYS;
			off += 2 * (size_t)r.bytes;
		}
		rs_status_reply(c, WIRE_OP_APPEND_KV, h.req_id, 0, st, v.n, NULL, 0);
		free(st);
		break;
	}
	case WIRE_OP_ATTEND: {
		wire_attend_view v;
		if (wire_decode_attend_req(m, h.meta_len, h.bulk_len, &s->lim, &v)) {
			rs_error(c, h.req_id, -EPROTO, "bad ATTEND");
			break;
		}
		if (!s->user.attend) {
			rs_status_reply(c, WIRE_OP_ATTEND, h.req_id, -ENOSYS, NULL, 0, NULL, 0);
			break;
		}
		uint64_t ob = wire_attend_reply_bulk(&v.shape, v.n_queries);
		struct xport_rdma_tok *t = calloc(1, sizeof(*t));
		int *st = calloc(v.n_queries, sizeof(*st));
		float *out = aligned_alloc(64, (ob + 63) & ~(uint64_t)63);
		if (!t || !st || !out) {
			free(t), free(st), free(out);
			rs_error(c, h.req_id, -ENOMEM, "out of memory");
			break;
		}
		memset(out, 0, ob);
		*t = (struct xport_rdma_tok){.b = {.task.fn = rtok_done, .loop = s->loop}, .c = c, .view = v,
		                             .req_id = h.req_id, .out = out, .out_bytes = ob, .st = st};
		float *o = out, *lse = out + (size_t)v.n_queries * v.shape.q_heads * v.shape.head_dim;
		/* The queries are 4-byte aligned: f is malloc'd, header and metadata are
		 * multiples of 4 bytes long. */
		rc = s->user.attend(s->user_ctx, &t->view, (const float *)(const void *)bulk, o, lse, st,
		                    (xport_attend_token *)t);
		if (rc == XPORT_DEFERRED) {
			t->frame = f;
			t->next = c->deferred;
			if (c->deferred)
				c->deferred->prev = t;
			c->deferred = t;
			return;
		}
		rs_status_reply(c, WIRE_OP_ATTEND, h.req_id, rc, st, v.n_queries, out, ob);
		rtok_free(t);
		break;
	}
	default:
		rs_error(c, h.req_id, -EOPNOTSUPP, "not carried by SEND/RECV");
		break;
	}
	free(f);
}

static void rs_on_cq(struct loop_src *src, uint32_t events)
{
	(void)events;
	struct rs_conn *c = (struct rs_conn *)((char *)src - offsetof(struct rs_conn, src));
	struct xrdma_wc wcs[32];
	for (;;) {
		int n = xrdma_poll(c->qp, wcs, 32, 0);
		if (n <= 0) {
			if (n < 0)
				c->qp_dead = true;
			break;
		}
		for (int k = 0; k < n; k++) {
			const struct xrdma_wc *wc = &wcs[k];
			if (wc->status) {
				if (!c->qp_dead)
					kvm_log(KVM_LOG_INFO, "xport_rdma_client_gone", "token=%u reason=\"%s\"", c->token,
						xrdma_conn_error(c->qp));
				c->qp_dead = true;
				continue;
			}
			if (!(wc->wr_id & MSG_WR))
				continue;
			if (wc->wr_id & MSG_WR_SEND) {
				ring_send_done(&c->ring, wc->wr_id);
				continue;
			}
			uint32_t slot = (uint32_t)(wc->wr_id & 0xFFFFFFFFu);
			uint8_t *f = malloc(wc->byte_len ? wc->byte_len : 1);
			if (f)
				memcpy(f, c->ring.buf + (size_t)slot * MSG_SLOT, wc->byte_len);
			if (ring_post_recv(&c->ring, c->qp, slot))
				c->qp_dead = true;
			if (f)
				rs_request(c, f, wc->byte_len);
		}
	}
	rs_pump(c);
}

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
	c->srv = s;
	rc = xrdma_conn_create(s->dev, s->mr, 2 * MSG_N + 4, &c->qp);
	if (rc)
		goto clean_c;
	rc = ring_init(&c->ring, s->dev, 2 * MSG_N);
	if (rc == 0)
		rc = xrdma_conn_connect(c->qp, &them);
	/* Before the CONNECT is answered, so before the client's first SEND (rxe
	 * refuses receives before INIT). */
	for (uint32_t i = 0; rc == 0 && i < MSG_N; i++)
		rc = ring_post_recv(&c->ring, c->qp, i);
	if (rc)
		goto clean_qp;
	c->src.cb = rs_on_cq;
	c->src.fd = xrdma_conn_fd(c->qp);
	rc = loop_add(s->loop, &c->src, EPOLLIN); /* handlers run on the loop thread */
	if (rc)
		goto clean_qp;
	struct xrdma_wc wc;
	while (xrdma_poll(c->qp, &wc, 1, 0) > 0) /* arms the CQs */
		;
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
	ring_free(&c->ring);
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
	s->loop = l;
	if (o) {
		s->lim = o->limits;
		s->bulk_csum = o->bulk_checksum != 0;
	} else {
		wire_limits_default(&s->lim);
		s->bulk_csum = true;
	}
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

struct srv_task {
	struct loop_task t;
	struct rserver *s;
};

/* Loop thread: the completion channels leave the loop; deferred ATTENDs still
 * running elsewhere will find no connection and only free themselves. */
static void srv_detach_fn(struct loop_task *t)
{
	struct rserver *s = ((struct srv_task *)t)->s;
	for (struct rs_conn *c = s->conns; c; c = c->next) {
		loop_del(s->loop, &c->src);
		for (struct xport_rdma_tok *k = c->deferred; k; k = k->next)
			k->c = NULL;
		c->deferred = NULL;
		while (c->txq) {
			struct rmsg *m = c->txq;
			c->txq = m->next;
			free(m);
		}
	}
}

static void rdma_server_close(xport_server *ss)
{
	struct rserver *s = (struct rserver *)ss;
	/* After this no handler runs, so the connection table is ours. */
	xport_server_close(s->tcp);
	struct srv_task st = {.t.fn = srv_detach_fn, .s = s};
	loop_run_sync(s->loop, &st.t);
	while (s->conns) {
		struct rs_conn *c = s->conns;
		s->conns = c->next;
		while (c->held) {
			struct rs_held *hd = c->held;
			c->held = hd->next;
			held_release(s, hd, -ECONNRESET);
		}
		xrdma_conn_destroy(c->qp);
		ring_free(&c->ring);
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
