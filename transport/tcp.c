/* The TCP backend: pipelined requests over several nonblocking connections
 * per peer, driven by the loop thread; bulk bytes move between the socket
 * and caller buffers with readv/writev. See transport.h for the contract and
 * docs/wire.md for the frames.
 *
 * Object lifetimes. A client request (struct req) is one allocation holding
 * its frame (header, metadata, bulk segments pointing at caller memory). It
 * lives from submission until its callback ran. A request completed early
 * (deadline) while its frame is half written gets a private copy of the
 * unsent bytes, so the caller's buffers are free as soon as cb runs; a reply
 * that arrives for a request no longer waiting is read into a sink. */
#include "transport/transport.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/auth.h"
#include "common/kvm_error.h"
#include "common/log.h"
#include "transport/loop_int.h"

#define MAX_IOV 128
#define SINK_BYTES (64u << 10)
#define READ_BUDGET (16u << 20) /* bytes per readiness event, for fairness */
#define RX_CHUNK (256u << 10)   /* bulk bytes per read when hashing them */

enum { RX_HDR, RX_META, RX_BULK };

struct seg {
	const void *p; /* NULL on the receive side: discard into the sink */
	size_t len;
};

struct txframe {
	struct txframe *next;
	uint8_t hdr[WIRE_HDR_LEN];
	uint8_t *meta;
	uint32_t meta_len;
	uint32_t nbulk;
	struct seg *bulk;
	uint64_t total, sent;
	/* Runs once: when the frame was fully written (0) or dropped (<0). */
	void (*done)(struct txframe *f, int status);
};

struct tcp_peer;
struct tcp_server;

struct req {
	struct req *next, *prev;
	struct txframe tx;
	struct tcp_peer *peer;
	struct conn *conn;
	uint8_t op;
	uint8_t on_wire; /* frame queued on conn->txq (not yet fully written) */
	uint64_t id;
	int64_t deadline;
	xport_cb cb;
	void *arg;
	uint32_t n;
	void *items;
	wire_shape shape;
	int status; /* set when completed, for the deferred callback */
};

struct conn {
	struct loop_src src;
	xport_loop *loop;
	struct tcp_peer *peer;  /* client side */
	struct tcp_server *srv; /* server side */
	struct conn *next, *prev;
	int dead;
	uint32_t events;
	char name[64];
	/* transmit */
	struct txframe *txq, *txq_tail;
	uint64_t tx_bytes;
	/* receive */
	int rx_state;
	uint32_t rx_got;
	uint8_t rx_hdr[WIRE_HDR_LEN];
	wire_header h;
	uint8_t *meta;
	uint32_t meta_cap;
	struct seg *segs;
	uint32_t nsegs, segs_cap, seg_i;
	size_t seg_off;
	uint64_t bulk_got;
	wire_csum_state csum;  /* the running segment (or whole-bulk) hash */
	int seg_mode;          /* bulk checksummed per segment (GET reply, PUT) */
	uint64_t *seg_csum;    /* per segment, when seg_mode */
	uint32_t seg_csum_cap;
	uint8_t *sink;
	/* client: requests assigned to this connection, oldest first */
	struct req *rq_head, *rq_tail;
	uint32_t n_inflight;
	struct req *rx_req;
	int32_t rx_status;
	/* server */
	int hello_done;
	int rx_paused;
	uint8_t *bulk_buf;
	size_t bulk_cap;
	struct xport_attend_token *deferred; /* ATTENDs being computed elsewhere */
	void **put_txn;  /* per entry of the PUT being received */
	int *put_st;
	uint32_t put_cap;
};

/* Locking. Everything below `mu` (and every connection of the peer) is
 * guarded by mu: the loop thread holds it while it handles the peer's events
 * and deadlines, a submitting thread while it queues its request and writes
 * it to the socket itself (no hand-off to the loop thread, one wake-up less).
 * Callbacks never run under mu: completions are queued on `done` and run by
 * the loop thread after it let go of mu (flush_done), so a callback may submit
 * to any peer and no two peer locks are ever held together. */
struct tcp_peer {
	struct xport_peer pub;
	xport_loop *loop;
	xport_opts opts;
	pthread_mutex_t mu;
	struct req *done_head, *done_tail; /* completed, callbacks not yet run */
	int flush_posted;
	struct loop_task flush_task;
	struct conn **conns;
	uint32_t n_conns;
	atomic_uint_fast64_t next_id;
	struct req *wq_head, *wq_tail; /* waiting for a connection with room */
	struct loop_ticker ticker;
	int closing;
	char name[80];
	char auth[KVM_AUTH_TOKEN_MAX + 1]; /* sent in HELLO (opts.auth_token copied) */
	uint16_t auth_len;
};

struct tcp_server {
	struct xport_server pub;
	struct loop_src src;
	xport_loop *loop;
	xport_opts opts;
	xport_handlers h;
	void *ctx;
	struct conn *conns;
	xport_stats st;
	int accept_paused; /* out of file descriptors: resumes when a connection closes */
	char auth[KVM_AUTH_TOKEN_MAX + 1]; /* required in HELLO (opts.auth_token copied) */
	uint16_t auth_len;
};

/* Copies opts->auth_token into dst (the caller's opts need not outlive the
 * connect or listen) and points opts at the copy. -EINVAL: too long. */
static int take_token(xport_opts *o, char *dst, uint16_t *len)
{
	size_t n = o->auth_token ? strlen(o->auth_token) : 0;
	if (n > KVM_AUTH_TOKEN_MAX || n > o->limits.max_msg)
		return -EINVAL;
	memcpy(dst, n ? o->auth_token : "", n);
	dst[n] = '\0';
	*len = (uint16_t)n;
	o->auth_token = n ? dst : NULL;
	return 0;
}

static void conn_write(struct conn *c);
static void conn_fail(struct conn *c, int err);
static void srv_conn_close(struct conn *c, int err);

/* ---- helpers ----------------------------------------------------------------- */

static void set_sockopts(int fd, const xport_opts *o)
{
	int one = 1, sz = (int)o->sockbuf_bytes;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (sz > 0) {
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
	}
}

static void update_events(struct conn *c)
{
	if (c->dead)
		return;
	uint32_t ev = (c->rx_paused ? 0 : EPOLLIN) | (c->txq ? EPOLLOUT : 0);
	if (ev != c->events) {
		c->events = ev;
		loop_mod(c->loop, &c->src, ev);
	}
}

static void txq_push(struct conn *c, struct txframe *f)
{
	f->next = NULL;
	if (c->txq_tail)
		c->txq_tail->next = f;
	else
		c->txq = f;
	c->txq_tail = f;
	c->tx_bytes += f->total;
}

/* Fills iov with frame f from byte offset off; returns the count. */
static int frame_iov(const struct txframe *f, uint64_t off, struct iovec *iov, int max)
{
	int n = 0;
	const void *pp[2] = {f->hdr, f->meta};
	size_t ll[2] = {WIRE_HDR_LEN, f->meta_len};
	for (int i = 0; i < 2 && n < max; i++) {
		if (off >= ll[i]) {
			off -= ll[i];
			continue;
		}
		iov[n].iov_base = (uint8_t *)pp[i] + off;
		iov[n++].iov_len = ll[i] - off;
		off = 0;
	}
	for (uint32_t i = 0; i < f->nbulk && n < max; i++) {
		if (off >= f->bulk[i].len) {
			off -= f->bulk[i].len;
			continue;
		}
		iov[n].iov_base = (uint8_t *)f->bulk[i].p + off;
		iov[n++].iov_len = f->bulk[i].len - off;
		off = 0;
	}
	return n;
}

/* ---- transmit ---------------------------------------------------------------- */

static void conn_write(struct conn *c)
{
	struct iovec iov[MAX_IOV];
	while (c->txq && !c->dead) {
		int n = 0;
		for (struct txframe *f = c->txq; f && n < MAX_IOV; f = f->next)
			n += frame_iov(f, f->sent, iov + n, MAX_IOV - n);
		/* sendmsg, not writev: MSG_NOSIGNAL turns a dead peer into EPIPE
		 * instead of a SIGPIPE that would kill the process. */
		struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
		ssize_t w = sendmsg(c->src.fd, &mh, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			if (c->srv)
				srv_conn_close(c, -errno);
			else
				conn_fail(c, -ECONNRESET);
			return;
		}
		if (c->srv) {
			c->srv->st.bytes_out += (uint64_t)w;
		}
		uint64_t left = (uint64_t)w;
		while (left && c->txq) {
			struct txframe *f = c->txq;
			uint64_t take = f->total - f->sent;
			if (take > left) {
				f->sent += left;
				left = 0;
				break;
			}
			left -= take;
			f->sent = f->total;
			c->txq = f->next;
			if (!c->txq)
				c->txq_tail = NULL;
			c->tx_bytes -= f->total;
			if (c->srv)
				c->srv->st.frames_out++;
			f->done(f, 0);
		}
	}
	if (c->dead)
		return;
	if (c->srv && c->rx_paused && c->tx_bytes <= c->srv->opts.tx_backlog_bytes / 2)
		c->rx_paused = 0;
	update_events(c);
}

/* ---- receive machinery shared by both sides ----------------------------------- */

static int ensure_segs(struct conn *c, uint32_t n)
{
	if (n > c->segs_cap) {
		struct seg *s = realloc(c->segs, (size_t)n * sizeof *s);
		if (!s)
			return -ENOMEM;
		c->segs = s;
		c->segs_cap = n;
	}
	if (n > c->seg_csum_cap) {
		uint64_t *x = realloc(c->seg_csum, (size_t)n * sizeof *x);
		if (!x)
			return -ENOMEM;
		c->seg_csum = x;
		c->seg_csum_cap = n;
	}
	return 0;
}

/* Discards the whole bulk of the current frame. */
static int rx_sink_all(struct conn *c)
{
	if (ensure_segs(c, 1))
		return -ENOMEM;
	c->segs[0].p = NULL;
	c->segs[0].len = c->h.bulk_len;
	c->nsegs = c->h.bulk_len ? 1 : 0;
	return 0;
}

/* Reads bulk bytes into the segments; returns 1 when the bulk is complete,
 * 0 on EAGAIN, <0 on a dead connection (0 bytes: -ECONNRESET). */
static int rx_bulk(struct conn *c, uint64_t *budget)
{
	struct iovec iov[MAX_IOV];
	while (c->bulk_got < c->h.bulk_len) {
		int n = 0;
		uint32_t i = c->seg_i;
		size_t off = c->seg_off;
		/* When checksumming, read at most RX_CHUNK per call so the bytes are
		 * hashed while still in the L2 cache the copy just filled. */
		size_t room = (c->h.flags & WIRE_F_BULK_NOCSUM) ? SIZE_MAX : RX_CHUNK;
		for (; i < c->nsegs && n < MAX_IOV && room; i++, off = 0) {
			size_t len = c->segs[i].len - off;
			if (len > room)
				len = room;
			room -= len;
			if (c->segs[i].p) {
				iov[n].iov_base = (uint8_t *)c->segs[i].p + off;
			} else {
				if (!c->sink && !(c->sink = malloc(SINK_BYTES)))
					return -ENOMEM;
				iov[n].iov_base = c->sink;
				if (len > SINK_BYTES)
					len = SINK_BYTES;
			}
			iov[n++].iov_len = len;
			if (!c->segs[i].p || len < c->segs[i].len - off)
				break; /* one sink piece per call (it is reused), or a cut segment */
		}
		ssize_t r = readv(c->src.fd, iov, n);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -errno;
		}
		if (r == 0)
			return -ECONNRESET;
		c->bulk_got += (uint64_t)r;
		if (c->srv)
			c->srv->st.bytes_in += (uint64_t)r;
		size_t left = (size_t)r;
		int check = !(c->h.flags & WIRE_F_BULK_NOCSUM);
		for (int k = 0; k < n && left; k++) {
			size_t take = iov[k].iov_len < left ? iov[k].iov_len : left;
			if (check)
				wire_csum_update(&c->csum, iov[k].iov_base, take);
			left -= take;
			c->seg_off += take;
			if (c->seg_off == c->segs[c->seg_i].len) {
				if (check && c->seg_mode) {
					c->seg_csum[c->seg_i] = wire_csum_final(&c->csum);
					wire_csum_init(&c->csum);
				}
				c->seg_i++;
				c->seg_off = 0;
			}
		}
		if ((uint64_t)r >= *budget) {
			*budget = 0;
			if (c->bulk_got < c->h.bulk_len)
				return 0;
		} else {
			*budget -= (uint64_t)r;
		}
	}
	return 1;
}

/* Reads exactly `want` bytes into buf (progress in *got): 1 done, 0 EAGAIN, <0 error. */
static int rx_exact(struct conn *c, uint8_t *buf, uint32_t want, uint32_t *got)
{
	while (*got < want) {
		ssize_t r = read(c->src.fd, buf + *got, want - *got);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -errno;
		}
		if (r == 0)
			return -ECONNRESET;
		*got += (uint32_t)r;
		if (c->srv)
			c->srv->st.bytes_in += (uint64_t)r;
	}
	return 1;
}

/* Common frame reader. on_header/on_meta/on_done are the side's handlers; each
 * returns 0 to continue or <0 after having closed/failed the connection. */
struct rx_ops {
	int (*on_header_error)(struct conn *c, int rc);
	int (*on_meta)(struct conn *c);
	int (*on_done)(struct conn *c, int bulk_ok);
};

static void conn_read(struct conn *c, const struct rx_ops *ops)
{
	uint64_t budget = READ_BUDGET;
	while (!c->dead && !c->rx_paused && budget) {
		int rc;
		if (c->rx_state == RX_HDR) {
			rc = rx_exact(c, c->rx_hdr, WIRE_HDR_LEN, &c->rx_got);
			if (rc <= 0)
				goto out;
			rc = wire_decode_header(c->rx_hdr, c->srv ? &c->srv->opts.limits : &c->peer->opts.limits, &c->h);
			if (rc) {
				ops->on_header_error(c, rc);
				return;
			}
			/* Lengths are within limits: now it is safe to size the buffer. */
			if (c->h.meta_len > c->meta_cap) {
				uint8_t *m = realloc(c->meta, c->h.meta_len);
				if (!m) {
					ops->on_header_error(c, -ENOMEM);
					return;
				}
				c->meta = m;
				c->meta_cap = c->h.meta_len;
			}
			c->rx_state = RX_META;
			c->rx_got = 0;
		}
		if (c->rx_state == RX_META) {
			rc = rx_exact(c, c->meta, c->h.meta_len, &c->rx_got);
			if (rc <= 0)
				goto out;
			budget = budget > c->h.meta_len + WIRE_HDR_LEN ? budget - c->h.meta_len - WIRE_HDR_LEN : 0;
			if (wire_csum_meta(c->rx_hdr, c->meta, c->h.meta_len) != c->h.meta_csum) {
				ops->on_header_error(c, -EBADMSG);
				return;
			}
			c->nsegs = c->seg_i = 0;
			c->seg_off = 0;
			c->bulk_got = 0;
			if (ops->on_meta(c))
				return;
			wire_csum_init(&c->csum);
			c->seg_mode = wire_bulk_segmented(c->h.opcode, c->h.flags);
			c->rx_state = RX_BULK;
		}
		if (c->rx_state == RX_BULK) {
			rc = rx_bulk(c, &budget);
			if (rc <= 0)
				goto out;
			int ok = 1;
			if (!(c->h.flags & WIRE_F_BULK_NOCSUM) && c->h.bulk_len) {
				uint64_t one = wire_csum_final(&c->csum);
				ok = (c->seg_mode ? wire_csum_combine(c->seg_csum, c->nsegs) : wire_csum_combine(&one, 1)) ==
				     c->h.bulk_csum;
			}
			c->rx_state = RX_HDR;
			c->rx_got = 0;
			if (ops->on_done(c, ok))
				return;
		}
		continue;
	out:
		if (rc < 0) {
			if (c->srv)
				srv_conn_close(c, rc);
			else
				conn_fail(c, rc == -ECONNRESET ? -ECONNRESET : rc);
		}
		return;
	}
}

/* ---- client ------------------------------------------------------------------- */

static void rq_unlink(struct req **head, struct req **tail, struct req *r)
{
	if (r->prev)
		r->prev->next = r->next;
	else
		*head = r->next;
	if (r->next)
		r->next->prev = r->prev;
	else
		*tail = r->prev;
	r->next = r->prev = NULL;
}

static void rq_append(struct req **head, struct req **tail, struct req *r)
{
	r->next = NULL;
	r->prev = *tail;
	if (*tail)
		(*tail)->next = r;
	else
		*head = r;
	*tail = r;
}

static void copied_frame_done(struct txframe *f, int status)
{
	(void)status;
	free(f);
}

/* Takes request r's frame off c->txq: unlinked if nothing was written yet,
 * else replaced by a private copy of the rest so the stream stays whole. */
static void detach_frame(struct conn *c, struct req *r)
{
	struct txframe *f = &r->tx, *prev = NULL;
	for (struct txframe *x = c->txq; x && x != f; x = x->next)
		prev = x;
	struct txframe *repl = NULL;
	uint64_t rest = f->total - f->sent;
	if (f->sent > 0) {
		repl = malloc(sizeof *repl + sizeof(struct seg) + rest);
		if (!repl) {
			/* Cannot keep the stream whole: shut the connection down (its
			 * next event fails the rest) and drop the frame. */
			shutdown(c->src.fd, SHUT_RDWR);
		}
	}
	if (repl) {
		memset(repl, 0, sizeof *repl);
		struct seg *s = (struct seg *)(repl + 1);
		uint8_t *bytes = (uint8_t *)(s + 1);
		struct iovec iov[MAX_IOV];
		uint64_t off = f->sent, pos = 0;
		while (pos < rest) {
			int n = frame_iov(f, off, iov, MAX_IOV);
			for (int i = 0; i < n; i++) {
				memcpy(bytes + pos, iov[i].iov_base, iov[i].iov_len);
				pos += iov[i].iov_len;
				off += iov[i].iov_len;
			}
		}
		/* A header-less frame: the copy is all bulk. */
		repl->meta = NULL;
		repl->meta_len = 0;
		s->p = bytes;
		s->len = rest;
		repl->bulk = s;
		repl->nbulk = 1;
		repl->total = rest + WIRE_HDR_LEN;
		repl->sent = WIRE_HDR_LEN; /* skip the (unused) header slot */
		repl->done = copied_frame_done;
		repl->next = f->next;
		c->tx_bytes += repl->total;
	}
	struct txframe *next = repl ? repl : f->next;
	if (prev)
		prev->next = next;
	else
		c->txq = next;
	if (c->txq_tail == f)
		c->txq_tail = repl ? repl : prev;
	c->tx_bytes -= f->total;
	r->on_wire = 0;
}

static void peer_pump(struct tcp_peer *p);

/* Completes r: unlinks it everywhere, runs cb, frees it. Loop thread only. */
static void req_complete(struct req *r, int status)
{
	struct conn *c = r->conn;
	if (c) {
		if (r->on_wire)
			detach_frame(c, r);
		if (c->rx_req == r) {
			/* The reply is being read into the caller's buffers: send the
			 * rest of it to the sink. */
			for (uint32_t i = c->seg_i; i < c->nsegs; i++)
				c->segs[i].p = NULL;
			c->rx_req = NULL;
		}
		rq_unlink(&c->rq_head, &c->rq_tail, r);
		c->n_inflight--;
	} else if (r->peer) {
		rq_unlink(&r->peer->wq_head, &r->peer->wq_tail, r);
	}
	if (status && status != -ECANCELED)
		kvm_log(KVM_LOG_DEBUG, "xport_req_failed", "peer=%s op=%s id=%llu err=\"%s\"", r->peer->name,
			wire_op_name(r->op), (unsigned long long)r->id, kvm_strerror(status));
	/* The callback runs later, outside mu (flush_done). */
	struct tcp_peer *p = r->peer;
	r->status = status;
	r->conn = NULL;
	r->next = r->prev = NULL;
	if (p->done_tail)
		p->done_tail->next = r;
	else
		p->done_head = r;
	p->done_tail = r;
}

/* Runs the callbacks of completed requests. Loop thread, mu not held. */
static void flush_done(struct tcp_peer *p)
{
	for (;;) {
		pthread_mutex_lock(&p->mu);
		struct req *r = p->done_head;
		p->done_head = p->done_tail = NULL;
		pthread_mutex_unlock(&p->mu);
		if (!r)
			return;
		while (r) {
			struct req *next = r->next;
			r->cb(r->arg, r->status);
			free(r);
			r = next;
		}
	}
}

/* The posted flush. Only here is flush_posted cleared: the task is out of the
 * loop's queue now, so posting it again cannot link it in twice. */
static void flush_fn(struct loop_task *t)
{
	struct tcp_peer *p = (struct tcp_peer *)((char *)t - offsetof(struct tcp_peer, flush_task));
	pthread_mutex_lock(&p->mu);
	p->flush_posted = 0;
	pthread_mutex_unlock(&p->mu);
	flush_done(p);
}

/* Called with mu held by a thread that is not (or may not be) inside the
 * loop's handling of this peer: has the loop run the callbacks queued. */
static void post_flush_locked(struct tcp_peer *p)
{
	if (p->done_head && !p->flush_posted) {
		p->flush_posted = 1;
		loop_post(p->loop, &p->flush_task);
	}
}

static void req_frame_done(struct txframe *f, int status)
{
	struct req *r = (struct req *)((char *)f - offsetof(struct req, tx));
	(void)status;
	r->on_wire = 0;
}

/* Picks the live connection with the fewest requests and room for one more. */
static struct conn *pick_conn(struct tcp_peer *p, int *any_live)
{
	struct conn *best = NULL;
	*any_live = 0;
	for (uint32_t i = 0; i < p->n_conns; i++) {
		struct conn *c = p->conns[i];
		if (!c || c->dead)
			continue;
		*any_live = 1;
		if (c->n_inflight >= p->opts.max_inflight)
			continue;
		if (!best || c->n_inflight < best->n_inflight)
			best = c;
	}
	return best;
}

static void req_start(struct conn *c, struct req *r)
{
	r->conn = c;
	rq_append(&c->rq_head, &c->rq_tail, r);
	c->n_inflight++;
	r->on_wire = 1;
	txq_push(c, &r->tx);
}

/* Moves waiting requests onto connections with room, then writes. */
static void peer_pump(struct tcp_peer *p)
{
	while (p->wq_head) {
		int live;
		struct conn *c = pick_conn(p, &live);
		if (!live) {
			req_complete(p->wq_head, -ENOTCONN);
			continue;
		}
		if (!c)
			break;
		struct req *r = p->wq_head;
		rq_unlink(&p->wq_head, &p->wq_tail, r);
		req_start(c, r);
	}
	for (uint32_t i = 0; i < p->n_conns; i++)
		if (p->conns[i] && !p->conns[i]->dead && p->conns[i]->txq)
			conn_write(p->conns[i]);
}

/* Queues r and writes it, from the submitting thread. Returns -ECANCELED
 * (r not taken) if the peer is closing. */
static int submit(struct req *r)
{
	struct tcp_peer *p = r->peer;
	pthread_mutex_lock(&p->mu);
	if (p->closing) {
		pthread_mutex_unlock(&p->mu);
		return -ECANCELED;
	}
	int live;
	struct conn *c = p->wq_head ? NULL : pick_conn(p, &live);
	if (c) {
		req_start(c, r);
		conn_write(c);
	} else {
		rq_append(&p->wq_head, &p->wq_tail, r);
		peer_pump(p);
	}
	post_flush_locked(p);
	pthread_mutex_unlock(&p->mu);
	return 0;
}

/* Fails every request of c and closes it. */
static void conn_fail(struct conn *c, int err)
{
	if (c->dead)
		return;
	c->dead = 1;
	loop_del(c->loop, &c->src);
	close(c->src.fd);
	kvm_log(KVM_LOG_WARN, "xport_conn_lost", "peer=%s conn=%s err=\"%s\" inflight=%u", c->peer->name, c->name,
		kvm_strerror(err), c->n_inflight);
	/* Frames on txq belong to requests (or are private copies). */
	while (c->txq) {
		struct txframe *f = c->txq;
		c->txq = f->next;
		f->done(f, err);
	}
	c->txq_tail = NULL;
	c->tx_bytes = 0;
	c->rx_req = NULL;
	while (c->rq_head)
		req_complete(c->rq_head, err);
	peer_pump(c->peer);
}

static struct req *find_req(struct conn *c, uint64_t id)
{
	for (struct req *r = c->rq_head; r; r = r->next)
		if (r->id == id)
			return r;
	return NULL;
}

static int cli_header_error(struct conn *c, int rc)
{
	kvm_log(KVM_LOG_WARN, "xport_bad_frame", "peer=%s conn=%s err=\"%s\"", c->peer->name, c->name,
		kvm_strerror(rc));
	conn_fail(c, rc == -EBADMSG ? -EBADMSG : -EPROTO);
	return -1;
}

/* Sets up where the reply's bulk goes. */
static int cli_on_meta(struct conn *c)
{
	const wire_limits *lim = &c->peer->opts.limits;
	wire_header *h = &c->h;
	c->rx_req = NULL;
	if (!(h->flags & WIRE_F_REPLY))
		return cli_header_error(c, -EPROTO);
	struct req *r = find_req(c, h->req_id);
	if (h->opcode == WIRE_OP_ERROR) {
		uint32_t code, ml;
		const char *msg;
		if (h->bulk_len || wire_decode_error(c->meta, h->meta_len, lim, &code, &msg, &ml))
			return cli_header_error(c, -EPROTO);
		kvm_log(KVM_LOG_WARN, "xport_remote_error", "peer=%s id=%llu code=%u msg=\"%.*s\"", c->peer->name,
			(unsigned long long)h->req_id, code, (int)ml, msg);
		if (r)
			req_complete(r, wire_err_to_errno(code) ? wire_err_to_errno(code) : -EPROTO);
		return rx_sink_all(c) ? cli_header_error(c, -ENOMEM) : 0;
	}
	if (!r) /* Timed out or cancelled: drop the reply. */
		return rx_sink_all(c) ? cli_header_error(c, -ENOMEM) : 0;
	if (h->opcode != r->op)
		return cli_header_error(c, -EPROTO);
	if (r->op == WIRE_OP_PING) {
		uint64_t stamp;
		if (h->bulk_len || wire_decode_ping(c->meta, h->meta_len, 1, &c->rx_status, &stamp))
			return cli_header_error(c, -EPROTO);
		c->rx_status = wire_err_to_errno((uint32_t)c->rx_status);
		c->rx_req = r;
		return 0;
	}
	wire_status_view sv;
	if (wire_decode_status_reply(c->meta, h->meta_len, lim, &sv) || sv.n != (sv.status ? sv.n : r->n))
		return cli_header_error(c, -EPROTO);
	c->rx_status = wire_err_to_errno(sv.status);
	c->rx_req = r;
	if (sv.status) {
		if (h->bulk_len)
			return cli_header_error(c, -EPROTO);
		return 0;
	}
	uint64_t want = 0;
	switch (r->op) {
	case WIRE_OP_GET_BLOCKS: {
		xport_block_io *b = r->items;
		if (ensure_segs(c, r->n))
			return cli_header_error(c, -ENOMEM);
		uint32_t k = 0;
		for (uint32_t i = 0; i < r->n; i++) {
			b[i].status = wire_err_to_errno(wire_status_at(&sv, i));
			if (b[i].status == 0) {
				c->segs[k].p = b[i].buf;
				c->segs[k++].len = b[i].ref.len;
				want += b[i].ref.len;
			}
		}
		c->nsegs = k;
		break;
	}
	case WIRE_OP_PUT_BLOCKS: {
		xport_block_io *b = r->items;
		for (uint32_t i = 0; i < r->n; i++)
			b[i].status = wire_err_to_errno(wire_status_at(&sv, i));
		break;
	}
	case WIRE_OP_APPEND_KV: {
		xport_append_io *a = r->items;
		for (uint32_t i = 0; i < r->n; i++)
			a[i].status = wire_err_to_errno(wire_status_at(&sv, i));
		break;
	}
	case WIRE_OP_ATTEND: {
		xport_attend_query *q = r->items;
		if (ensure_segs(c, 2 * r->n))
			return cli_header_error(c, -ENOMEM);
		size_t ob = (size_t)r->shape.q_heads * r->shape.head_dim * 4, lb = (size_t)r->shape.q_heads * 4;
		for (uint32_t i = 0; i < r->n; i++) {
			q[i].status = wire_err_to_errno(wire_status_at(&sv, i));
			c->segs[i] = (struct seg){q[i].o, ob};
			c->segs[r->n + i] = (struct seg){q[i].lse, lb};
		}
		c->nsegs = 2 * r->n;
		want = (uint64_t)r->n * (ob + lb);
		break;
	}
	default:
		return cli_header_error(c, -EPROTO);
	}
	if (h->bulk_len != want)
		return cli_header_error(c, -EPROTO);
	return 0;
}

static int cli_on_done(struct conn *c, int bulk_ok)
{
	struct req *r = c->rx_req;
	c->rx_req = NULL;
	if (r && bulk_ok && r->op == WIRE_OP_GET_BLOCKS && c->rx_status == 0) {
		xport_block_io *b = r->items;
		int have = !(c->h.flags & WIRE_F_BULK_NOCSUM) && c->seg_mode;
		for (uint32_t i = 0, k = 0; i < r->n; i++)
			b[i].csum = b[i].status == 0 && have && k < c->nsegs ? c->seg_csum[k++] : 0;
	}
	if (r)
		req_complete(r, bulk_ok ? c->rx_status : -EBADMSG);
	if (!c->dead)
		peer_pump(c->peer);
	return c->dead ? -1 : 0;
}

static const struct rx_ops cli_rx = {cli_header_error, cli_on_meta, cli_on_done};

static void cli_conn_cb(struct loop_src *s, uint32_t ev)
{
	struct conn *c = (struct conn *)s;
	struct tcp_peer *p = c->peer;
	pthread_mutex_lock(&p->mu);
	/* Hang-ups and errors surface as read results. */
	if (!c->dead && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		conn_read(c, &cli_rx);
	if (!c->dead && (ev & EPOLLOUT))
		conn_write(c);
	pthread_mutex_unlock(&p->mu);
	flush_done(p);
}

static void peer_tick(struct loop_ticker *t, int64_t now)
{
	struct tcp_peer *p = (struct tcp_peer *)((char *)t - offsetof(struct tcp_peer, ticker));
	pthread_mutex_lock(&p->mu);
	for (struct req *r = p->wq_head, *nx; r; r = nx) {
		nx = r->next;
		if (r->deadline <= now)
			req_complete(r, -ETIMEDOUT);
	}
	for (uint32_t i = 0; i < p->n_conns; i++) {
		struct conn *c = p->conns[i];
		if (!c || c->dead)
			continue;
		for (struct req *r = c->rq_head, *nx; r; r = nx) {
			nx = r->next;
			if (r->deadline <= now)
				req_complete(r, -ETIMEDOUT);
			if (c->dead)
				break;
		}
	}
	peer_pump(p);
	pthread_mutex_unlock(&p->mu);
	flush_done(p);
}

/* ---- building requests (caller's thread) ------------------------------------- */

static struct req *req_new(struct tcp_peer *p, uint8_t op, size_t meta_len, uint32_t nbulk, uint32_t timeout_ms,
			   xport_cb cb, void *arg)
{
	struct req *r = calloc(1, sizeof *r + meta_len + (size_t)nbulk * sizeof(struct seg));
	if (!r)
		return NULL;
	r->peer = p;
	r->op = op;
	r->id = atomic_fetch_add(&p->next_id, 1);
	r->cb = cb;
	r->arg = arg;
	r->deadline = loop_now_ns() + (int64_t)(timeout_ms ? timeout_ms : 30000) * 1000000;
	r->tx.bulk = (struct seg *)(r + 1);
	r->tx.nbulk = nbulk;
	r->tx.meta = (uint8_t *)(r->tx.bulk + nbulk);
	r->tx.meta_len = (uint32_t)meta_len;
	r->tx.done = req_frame_done;
	return r;
}

/* Finishes the header (lengths, checksums) and hands r to the loop. */
static int req_submit(struct tcp_peer *p, struct req *r, uint32_t meta_used)
{
	uint64_t bulk = 0;
	for (uint32_t i = 0; i < r->tx.nbulk; i++)
		bulk += r->tx.bulk[i].len;
	if (bulk > p->opts.limits.max_bulk || meta_used > p->opts.limits.max_meta) {
		free(r);
		return -EMSGSIZE;
	}
	/* Refuse here what the peer's decoder would refuse (it would answer with
	 * ERROR and close the connection, failing every other request on it):
	 * run the same decoder, with our limits, on what we encoded. */
	int rc = 0;
	const wire_limits *lim = &p->opts.limits;
	switch (r->op) {
	case WIRE_OP_GET_BLOCKS:
	case WIRE_OP_PUT_BLOCKS: {
		wire_blocks_view v;
		rc = wire_decode_blocks_req(r->tx.meta, meta_used, (uint32_t)bulk, r->op == WIRE_OP_PUT_BLOCKS, lim, &v);
		break;
	}
	case WIRE_OP_ATTEND: {
		wire_attend_view v;
		rc = wire_decode_attend_req(r->tx.meta, meta_used, (uint32_t)bulk, lim, &v);
		break;
	}
	case WIRE_OP_APPEND_KV: {
		wire_append_view v;
		rc = wire_decode_append_req(r->tx.meta, meta_used, (uint32_t)bulk, lim, &v);
		break;
	}
	default:
		break;
	}
	if (rc) {
		free(r);
		return rc == -EPROTO ? -EINVAL : rc;
	}
	wire_header h = {.magic = WIRE_MAGIC,
			 .version = WIRE_VERSION,
			 .opcode = r->op,
			 .req_id = r->id,
			 .meta_len = meta_used,
			 .bulk_len = (uint32_t)bulk};
	if (bulk && !p->opts.bulk_checksum) {
		h.flags |= WIRE_F_BULK_NOCSUM;
	} else if (bulk && wire_bulk_segmented(r->op, 0)) {
		/* PUT: one checksum per entry, the caller's if it has one. */
		xport_block_io *b = r->items;
		wire_csum_state cs;
		wire_csum_init(&cs);
		for (uint32_t i = 0; i < r->n; i++) {
			uint64_t x = b[i].csum;
			if (!x) {
				struct iovec one = {b[i].buf, b[i].ref.len};
				x = wire_csum_iov(&one, 1);
			}
			wire_csum_update(&cs, &x, 8);
		}
		h.bulk_csum = wire_csum_final(&cs);
	} else if (bulk) {
		uint64_t one = wire_csum_iov((const struct iovec *)(void *)r->tx.bulk, (int)r->tx.nbulk);
		h.bulk_csum = wire_csum_combine(&one, 1);
	}
	r->tx.meta_len = meta_used;
	wire_encode_header(&h, r->tx.hdr);
	h.meta_csum = wire_csum_meta(r->tx.hdr, r->tx.meta, meta_used);
	wire_encode_header(&h, r->tx.hdr);
	r->tx.total = WIRE_HDR_LEN + meta_used + bulk;
	rc = submit(r);
	if (rc)
		free(r);
	return rc;
}
_Static_assert(sizeof(struct seg) == sizeof(struct iovec) && offsetof(struct seg, len) == offsetof(struct iovec, iov_len),
	       "seg must alias iovec");

static int tcp_blocks(xport_peer *pp, uint8_t op, xport_block_io *b, uint32_t n, uint32_t timeout_ms, xport_cb cb,
		      void *arg)
{
	struct tcp_peer *p = (struct tcp_peer *)pp;
	if (!b || n == 0 || !cb)
		return -EINVAL;
	if (n > p->opts.limits.max_blocks)
		return -EMSGSIZE;
	for (uint32_t i = 0; i < n; i++)
		if (!b[i].buf || b[i].ref.len == 0)
			return -EINVAL;
	int put = op == WIRE_OP_PUT_BLOCKS;
	size_t ml = wire_blocks_req_size(n);
	struct req *r = req_new(p, op, ml, put ? n : 0, timeout_ms, cb, arg);
	if (!r)
		return -ENOMEM;
	r->n = n;
	r->items = b;
	wire_buf wb = {.p = r->tx.meta, .cap = ml};
	wire_put_u32(&wb, n);
	wire_put_u32(&wb, 0);
	for (uint32_t i = 0; i < n; i++) {
		wire_put_handle(&wb, &b[i].ref.h);
		wire_put_u32(&wb, b[i].ref.offset);
		wire_put_u32(&wb, b[i].ref.len);
		if (put)
			r->tx.bulk[i] = (struct seg){b[i].buf, b[i].ref.len};
	}
	return req_submit(p, r, (uint32_t)ml);
}

static int tcp_get_blocks(xport_peer *pp, xport_block_io *b, uint32_t n, uint32_t t, xport_cb cb, void *arg)
{
	return tcp_blocks(pp, WIRE_OP_GET_BLOCKS, b, n, t, cb, arg);
}
static int tcp_put_blocks(xport_peer *pp, xport_block_io *b, uint32_t n, uint32_t t, xport_cb cb, void *arg)
{
	return tcp_blocks(pp, WIRE_OP_PUT_BLOCKS, b, n, t, cb, arg);
}

static int tcp_attend(xport_peer *pp, const wire_shape *s, xport_attend_query *q, uint32_t n, uint32_t timeout_ms,
		      xport_cb cb, void *arg)
{
	struct tcp_peer *p = (struct tcp_peer *)pp;
	if (!s || !q || n == 0 || !cb || s->q_heads == 0 || s->head_dim == 0)
		return -EINVAL;
	if (n > p->opts.limits.max_queries)
		return -EMSGSIZE;
	uint64_t handles = 0;
	for (uint32_t i = 0; i < n; i++) {
		if (!q[i].q || !q[i].o || !q[i].lse || (q[i].n_blocks && !q[i].blocks))
			return -EINVAL;
		handles += q[i].n_blocks;
	}
	if (handles > p->opts.limits.max_blocks)
		return -EMSGSIZE;
	size_t ml = wire_attend_req_size(n, (uint32_t)handles);
	struct req *r = req_new(p, WIRE_OP_ATTEND, ml, n, timeout_ms, cb, arg);
	if (!r)
		return -ENOMEM;
	r->n = n;
	r->items = q;
	r->shape = *s;
	wire_buf wb = {.p = r->tx.meta, .cap = ml};
	wire_encode_attend_begin(&wb, s, n);
	size_t qb = (size_t)s->q_heads * s->head_dim * 4;
	for (uint32_t i = 0; i < n; i++) {
		wire_encode_attend_query(&wb, q[i].n_tokens, q[i].blocks, q[i].n_blocks);
		r->tx.bulk[i] = (struct seg){q[i].q, qb};
	}
	if (wb.err) {
		free(r);
		return wb.err;
	}
	return req_submit(p, r, (uint32_t)wb.len);
}

static int tcp_append(xport_peer *pp, xport_append_io *a, uint32_t n, uint32_t timeout_ms, xport_cb cb, void *arg)
{
	struct tcp_peer *p = (struct tcp_peer *)pp;
	if (!a || n == 0 || !cb)
		return -EINVAL;
	if (n > p->opts.limits.max_blocks)
		return -EMSGSIZE;
	for (uint32_t i = 0; i < n; i++)
		if (!a[i].k || !a[i].v || !a[i].ref.bytes || !a[i].ref.n_tokens)
			return -EINVAL;
	size_t ml = wire_append_req_size(n);
	struct req *r = req_new(p, WIRE_OP_APPEND_KV, ml, 2 * n, timeout_ms, cb, arg);
	if (!r)
		return -ENOMEM;
	r->n = n;
	r->items = a;
	wire_buf wb = {.p = r->tx.meta, .cap = ml};
	wire_put_u32(&wb, n);
	wire_put_u32(&wb, 0);
	for (uint32_t i = 0; i < n; i++) {
		const wire_append_ref *e = &a[i].ref;
		wire_put_handle(&wb, &e->h);
		wire_put_u32(&wb, e->layer);
		wire_put_u32(&wb, e->token);
		wire_put_u32(&wb, e->n_tokens);
		wire_put_u32(&wb, e->bytes);
		r->tx.bulk[2 * i] = (struct seg){a[i].k, e->bytes};
		r->tx.bulk[2 * i + 1] = (struct seg){a[i].v, e->bytes};
	}
	return req_submit(p, r, (uint32_t)wb.len);
}

static int tcp_ping(xport_peer *pp, uint32_t timeout_ms, xport_cb cb, void *arg)
{
	struct tcp_peer *p = (struct tcp_peer *)pp;
	if (!cb)
		return -EINVAL;
	struct req *r = req_new(p, WIRE_OP_PING, 8, 0, timeout_ms, cb, arg);
	if (!r)
		return -ENOMEM;
	wire_buf wb = {.p = r->tx.meta, .cap = 8};
	wire_encode_ping(&wb, 0, (uint64_t)loop_now_ns());
	return req_submit(p, r, 8);
}

/* ---- connect (caller's thread, blocking with a deadline) ------------------------ */

static int wait_fd(int fd, short ev, int64_t deadline)
{
	for (;;) {
		int64_t left = (deadline - loop_now_ns()) / 1000000;
		if (left <= 0)
			return -ETIMEDOUT;
		struct pollfd pfd = {.fd = fd, .events = ev};
		int n = poll(&pfd, 1, (int)left);
		if (n > 0)
			return 0;
		if (n < 0 && errno != EINTR)
			return -errno;
	}
}

static int io_full(int fd, void *buf, size_t len, int wr, int64_t deadline)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = wr ? send(fd, (uint8_t *)buf + done, len - done, MSG_NOSIGNAL)
			       : recv(fd, (uint8_t *)buf + done, len - done, 0);
		if (n > 0) {
			done += (size_t)n;
			continue;
		}
		if (n == 0)
			return -ECONNRESET;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return -errno;
		int rc = wait_fd(fd, wr ? POLLOUT : POLLIN, deadline);
		if (rc)
			return rc;
	}
	return 0;
}

static int hello_exchange(int fd, struct tcp_peer *p, int64_t deadline)
{
	uint8_t buf[WIRE_HDR_LEN + 64 + KVM_AUTH_TOKEN_MAX];
	wire_hello hl = {.node_id = p->opts.node_id, .caps = WIRE_CAP_TCP | WIRE_CAP_ATTEND, .ver_min = 1, .ver_max = 1,
			 .auth_len = p->auth_len, .auth = (const uint8_t *)p->auth};
	wire_buf wb = {.p = buf + WIRE_HDR_LEN, .cap = 64 + KVM_AUTH_TOKEN_MAX};
	wire_encode_hello(&wb, 0, 0, &hl);
	wire_header h = {.magic = WIRE_MAGIC, .version = WIRE_VERSION, .opcode = WIRE_OP_HELLO, .meta_len = (uint32_t)wb.len};
	wire_encode_header(&h, buf);
	h.meta_csum = wire_csum_meta(buf, buf + WIRE_HDR_LEN, wb.len);
	wire_encode_header(&h, buf);
	int rc = io_full(fd, buf, WIRE_HDR_LEN + wb.len, 1, deadline);
	if (rc)
		return rc;
	uint8_t rh[WIRE_HDR_LEN];
	rc = io_full(fd, rh, WIRE_HDR_LEN, 0, deadline);
	if (rc)
		return rc;
	rc = wire_decode_header(rh, &p->opts.limits, &h);
	if (rc)
		return rc;
	if (h.meta_len > 4096 || h.bulk_len)
		return -EPROTO;
	uint8_t meta[4096];
	rc = io_full(fd, meta, h.meta_len, 0, deadline);
	if (rc)
		return rc;
	if (wire_csum_meta(rh, meta, h.meta_len) != h.meta_csum)
		return -EBADMSG;
	if (h.opcode == WIRE_OP_ERROR) {
		uint32_t code, ml;
		const char *msg;
		rc = wire_decode_error(meta, h.meta_len, &p->opts.limits, &code, &msg, &ml);
		return rc ? rc : (wire_err_to_errno(code) ? wire_err_to_errno(code) : -EPROTO);
	}
	int32_t st;
	if (h.opcode != WIRE_OP_HELLO || !(h.flags & WIRE_F_REPLY) ||
	    wire_decode_hello(meta, h.meta_len, 1, &p->opts.limits, &st, &hl))
		return -EPROTO;
	if (st)
		return wire_err_to_errno((uint32_t)st);
	p->pub.remote_node_id = hl.node_id;
	p->pub.remote_caps = hl.caps;
	return 0;
}

static int dial(const char *host, uint16_t port, struct tcp_peer *p, int64_t deadline, int *out)
{
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
	char ps[8];
	snprintf(ps, sizeof ps, "%u", port);
	int rc = getaddrinfo(host, ps, &hints, &ai);
	if (rc)
		return -EHOSTUNREACH;
	int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		rc = -errno;
		goto clean_ai;
	}
	set_sockopts(fd, &p->opts);
	if (connect(fd, ai->ai_addr, ai->ai_addrlen) && errno != EINPROGRESS) {
		rc = -errno;
		goto clean_fd;
	}
	rc = wait_fd(fd, POLLOUT, deadline);
	if (rc)
		goto clean_fd;
	int err = 0;
	socklen_t el = sizeof err;
	getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
	if (err) {
		rc = -err;
		goto clean_fd;
	}
	rc = hello_exchange(fd, p, deadline);
	if (rc)
		goto clean_fd;
	freeaddrinfo(ai);
	*out = fd;
	return 0;
clean_fd:
	close(fd);
clean_ai:
	freeaddrinfo(ai);
	return rc;
}

struct peer_task {
	struct loop_task t;
	struct tcp_peer *p;
};

static void attach_fn(struct loop_task *t)
{
	struct tcp_peer *p = ((struct peer_task *)t)->p;
	pthread_mutex_lock(&p->mu);
	for (uint32_t i = 0; i < p->n_conns; i++) {
		struct conn *c = p->conns[i];
		c->events = EPOLLIN;
		if (loop_add(p->loop, &c->src, c->events))
			conn_fail(c, -EIO);
	}
	pthread_mutex_unlock(&p->mu);
	p->ticker.fn = peer_tick;
	loop_ticker_add(p->loop, &p->ticker);
}

static void free_conn(struct conn *c)
{
	free(c->meta);
	free(c->segs);
	free(c->sink);
	free(c->bulk_buf);
	free(c->put_txn);
	free(c->put_st);
	free(c->seg_csum);
	free(c);
}

int xport_tcp_connect(xport_loop *l, const char *host, uint16_t port, const xport_opts *o, xport_peer **out)
{
	int rc;
	if (!l || !host || !out)
		return -EINVAL;
	struct tcp_peer *p = calloc(1, sizeof *p);
	if (!p)
		return -ENOMEM;
	p->pub.ops = &xport_tcp_ops;
	p->loop = l;
	if (o)
		p->opts = *o;
	else
		xport_opts_default(&p->opts);
	if (p->opts.n_conns == 0)
		p->opts.n_conns = 1;
	if (p->opts.max_inflight == 0)
		p->opts.max_inflight = 1;
	if (take_token(&p->opts, p->auth, &p->auth_len)) {
		free(p);
		return -EINVAL;
	}
	atomic_init(&p->next_id, 1);
	pthread_mutex_init(&p->mu, NULL);
	p->flush_task.fn = flush_fn;
	snprintf(p->name, sizeof p->name, "%s:%u", host, port);
	p->conns = calloc(p->opts.n_conns, sizeof *p->conns);
	if (!p->conns) {
		rc = -ENOMEM;
		goto clean_peer;
	}
	int64_t deadline = loop_now_ns() + (int64_t)(p->opts.connect_timeout_ms ? p->opts.connect_timeout_ms : 3000) * 1000000;
	for (; p->n_conns < p->opts.n_conns; p->n_conns++) {
		struct conn *c = calloc(1, sizeof *c);
		if (!c) {
			rc = -ENOMEM;
			goto clean_conns;
		}
		rc = dial(host, port, p, deadline, &c->src.fd);
		if (rc) {
			free(c);
			goto clean_conns;
		}
		c->src.cb = cli_conn_cb;
		c->loop = l;
		c->peer = p;
		snprintf(c->name, sizeof c->name, "%u", p->n_conns);
		p->conns[p->n_conns] = c;
	}
	struct peer_task t = {.t.fn = attach_fn, .p = p};
	loop_run_sync(l, &t.t);
	kvm_log(KVM_LOG_INFO, "xport_connected", "peer=%s conns=%u remote_node=%llu", p->name, p->n_conns,
		(unsigned long long)p->pub.remote_node_id);
	*out = &p->pub;
	return 0;
clean_conns:
	while (p->n_conns > 0) {
		struct conn *c = p->conns[--p->n_conns];
		close(c->src.fd);
		free(c);
	}
	free(p->conns);
clean_peer:
	kvm_log(KVM_LOG_WARN, "xport_connect_failed", "peer=%s:%u err=\"%s\"", host, port, kvm_strerror(rc));
	pthread_mutex_destroy(&p->mu);
	free(p);
	return rc;
}

static void close_fn(struct loop_task *t)
{
	struct tcp_peer *p = ((struct peer_task *)t)->p;
	loop_ticker_del(p->loop, &p->ticker);
	pthread_mutex_lock(&p->mu);
	p->closing = 1;
	while (p->wq_head)
		req_complete(p->wq_head, -ECANCELED);
	for (uint32_t i = 0; i < p->n_conns; i++) {
		struct conn *c = p->conns[i];
		if (!c->dead) {
			/* Like conn_fail, but quiet and with -ECANCELED. */
			c->dead = 1;
			loop_del(c->loop, &c->src);
			close(c->src.fd);
			while (c->txq) {
				struct txframe *f = c->txq;
				c->txq = f->next;
				f->done(f, -ECANCELED);
			}
			c->rx_req = NULL;
			while (c->rq_head)
				req_complete(c->rq_head, -ECANCELED);
		}
	}
	pthread_mutex_unlock(&p->mu);
	flush_done(p); /* every callback runs before xport_close returns */
}

static void tcp_close(xport_peer *pp)
{
	struct tcp_peer *p = (struct tcp_peer *)pp;
	struct peer_task t = {.t.fn = close_fn, .p = p};
	loop_run_sync(p->loop, &t.t);
	for (uint32_t i = 0; i < p->n_conns; i++)
		free_conn(p->conns[i]);
	free(p->conns);
	pthread_mutex_destroy(&p->mu);
	free(p);
}

/* ---- server ------------------------------------------------------------------- */

struct srv_frame {
	struct txframe f;
	struct conn *c;
	uint32_t npins;
	void **pins;
	uint64_t *csums; /* GET reply: per entry, 0 = hash it */
	void *owned;     /* ATTEND output */
};

static void srv_frame_done(struct txframe *f, int status)
{
	(void)status;
	struct srv_frame *sf = (struct srv_frame *)f;
	struct tcp_server *s = sf->c->srv;
	for (uint32_t i = 0; i < sf->npins; i++)
		if (s->h.unpin)
			s->h.unpin(s->ctx, sf->pins[i]);
	free(sf->owned);
	free(sf);
}

/* A reply frame with room for meta_len bytes of metadata, nbulk segments and
 * npins pins. */
static struct srv_frame *srv_frame_new(struct conn *c, size_t meta_len, uint32_t nbulk, uint32_t npins)
{
	struct srv_frame *sf = calloc(1, sizeof *sf + meta_len + (size_t)nbulk * sizeof(struct seg) +
						 (size_t)npins * (sizeof(void *) + sizeof(uint64_t)));
	if (!sf)
		return NULL;
	sf->c = c;
	sf->f.bulk = (struct seg *)(sf + 1);
	sf->csums = (uint64_t *)(sf->f.bulk + nbulk);
	sf->pins = (void **)(sf->csums + npins);
	sf->f.meta = (uint8_t *)(sf->pins + npins);
	sf->f.done = srv_frame_done;
	return sf;
}

static void srv_send(struct conn *c, struct srv_frame *sf, uint8_t op, uint64_t id, uint32_t meta_len)
{
	uint64_t bulk = 0;
	for (uint32_t i = 0; i < sf->f.nbulk; i++)
		bulk += sf->f.bulk[i].len;
	wire_header h = {.magic = WIRE_MAGIC,
			 .version = WIRE_VERSION,
			 .opcode = op,
			 .flags = WIRE_F_REPLY,
			 .req_id = id,
			 .meta_len = meta_len,
			 .bulk_len = (uint32_t)bulk};
	if (bulk && !c->srv->opts.bulk_checksum) {
		h.flags |= WIRE_F_BULK_NOCSUM;
	} else if (bulk && wire_bulk_segmented(op, WIRE_F_REPLY)) {
		/* GET: one checksum per entry; the store's cached one if it has it. */
		wire_csum_state cs;
		wire_csum_init(&cs);
		for (uint32_t i = 0; i < sf->f.nbulk; i++) {
			uint64_t x = sf->csums[i];
			if (!x)
				x = wire_csum_iov((const struct iovec *)(void *)&sf->f.bulk[i], 1);
			wire_csum_update(&cs, &x, 8);
		}
		h.bulk_csum = wire_csum_final(&cs);
	} else if (bulk) {
		uint64_t one = wire_csum_iov((const struct iovec *)(void *)sf->f.bulk, (int)sf->f.nbulk);
		h.bulk_csum = wire_csum_combine(&one, 1);
	}
	sf->f.meta_len = meta_len;
	wire_encode_header(&h, sf->f.hdr);
	h.meta_csum = wire_csum_meta(sf->f.hdr, sf->f.meta, meta_len);
	wire_encode_header(&h, sf->f.hdr);
	sf->f.total = WIRE_HDR_LEN + meta_len + bulk;
	txq_push(c, &sf->f);
	if (c->tx_bytes > c->srv->opts.tx_backlog_bytes)
		c->rx_paused = 1; /* back-pressure: read no more until the peer drains */
}

/* Sends ERROR(code, msg) for request id, flushes what it can and closes. */
static int srv_reject(struct conn *c, int err, uint64_t id, const char *msg)
{
	struct tcp_server *s = c->srv;
	s->st.proto_errors++;
	size_t ml = wire_error_size(s->opts.limits.max_msg);
	struct srv_frame *sf = srv_frame_new(c, ml, 0, 0);
	kvm_log(KVM_LOG_WARN, "xport_reject", "conn=%s id=%llu err=\"%s\" msg=\"%s\"", c->name, (unsigned long long)id,
		kvm_strerror(err), msg);
	if (sf) {
		wire_buf wb = {.p = sf->f.meta, .cap = ml};
		wire_encode_error(&wb, wire_err_from_errno(err), msg, &s->opts.limits);
		srv_send(c, sf, WIRE_OP_ERROR, id, (uint32_t)wb.len);
		conn_write(c);
	}
	srv_conn_close(c, err);
	return -1;
}

static int srv_header_error(struct conn *c, int rc)
{
	uint64_t id;
	memcpy(&id, c->rx_hdr + 8, 8);
	const char *m = rc == -EMSGSIZE ? "length above limit"
			: rc == -EPROTONOSUPPORT ? "unsupported version"
			: rc == -EOPNOTSUPP ? "unknown opcode"
			: rc == -EBADMSG ? "checksum mismatch"
				: "malformed frame";
	return srv_reject(c, rc, id, m);
}

static int srv_reply_status(struct conn *c, uint8_t op, uint64_t id, int status, const int *st, uint32_t n)
{
	size_t ml = wire_status_reply_size(status ? 0 : n);
	struct srv_frame *sf = srv_frame_new(c, ml, 0, 0);
	if (!sf)
		return srv_reject(c, -ENOMEM, id, "out of memory");
	wire_buf wb = {.p = sf->f.meta, .cap = ml};
	wire_put_u32(&wb, wire_err_from_errno(status));
	wire_put_u32(&wb, status ? 0 : n);
	for (uint32_t i = 0; !status && i < n; i++)
		wire_put_u32(&wb, wire_err_from_errno(st[i]));
	srv_send(c, sf, op, id, (uint32_t)wb.len);
	return 0;
}

static int ensure_put(struct conn *c, uint32_t n)
{
	if (n <= c->put_cap)
		return 0;
	void **t = realloc(c->put_txn, (size_t)n * sizeof *t);
	if (!t)
		return -ENOMEM;
	c->put_txn = t;
	int *s = realloc(c->put_st, (size_t)n * sizeof *s);
	if (!s)
		return -ENOMEM;
	c->put_st = s;
	c->put_cap = n;
	return 0;
}

static int ensure_bulk(struct conn *c, size_t n)
{
	if (n <= c->bulk_cap)
		return 0;
	free(c->bulk_buf);
	c->bulk_buf = aligned_alloc(64, (n + 63) & ~(size_t)63);
	c->bulk_cap = c->bulk_buf ? n : 0;
	return c->bulk_buf ? 0 : -ENOMEM;
}

static int srv_on_meta(struct conn *c)
{
	struct tcp_server *s = c->srv;
	const wire_limits *lim = &s->opts.limits;
	wire_header *h = &c->h;
	int rc = 0;
	if (h->flags & WIRE_F_REPLY)
		return srv_reject(c, -EPROTO, h->req_id, "reply sent to a server");
	if (!c->hello_done && h->opcode != WIRE_OP_HELLO)
		return srv_reject(c, -EPROTO, h->req_id, "HELLO expected first");
	switch (h->opcode) {
	case WIRE_OP_HELLO:
	case WIRE_OP_PING:
	case WIRE_OP_GET_BLOCKS:
		if (h->bulk_len)
			return srv_reject(c, -EPROTO, h->req_id, "unexpected bulk");
		return 0;
	case WIRE_OP_ERROR:
		return srv_reject(c, -EPROTO, h->req_id, "ERROR sent to a server");
	case WIRE_OP_PUT_BLOCKS: {
		wire_blocks_view v;
		rc = wire_decode_blocks_req(c->meta, h->meta_len, h->bulk_len, 1, lim, &v);
		if (rc)
			return srv_reject(c, rc, h->req_id, "bad PUT_BLOCKS");
		if (ensure_put(c, v.n) || ensure_segs(c, v.n))
			return srv_reject(c, -ENOMEM, h->req_id, "out of memory");
		for (uint32_t i = 0; i < v.n; i++) {
			wire_block_ref r;
			wire_blocks_ref(&v, i, &r);
			void *dst = NULL;
			c->put_txn[i] = NULL;
			c->put_st[i] = s->h.put_prepare ? s->h.put_prepare(s->ctx, &r, &dst, &c->put_txn[i]) : -ENOSYS;
			if (c->put_st[i] == 0 && !dst)
				c->put_st[i] = -EIO;
			c->segs[i] = (struct seg){c->put_st[i] == 0 ? dst : NULL, r.len};
		}
		c->nsegs = v.n;
		return 0;
	}
	case WIRE_OP_ATTEND: {
		wire_attend_view v;
		rc = wire_decode_attend_req(c->meta, h->meta_len, h->bulk_len, lim, &v);
		if (rc)
			return srv_reject(c, rc, h->req_id, "bad ATTEND");
		break;
	}
	case WIRE_OP_APPEND_KV: {
		wire_append_view v;
		rc = wire_decode_append_req(c->meta, h->meta_len, h->bulk_len, lim, &v);
		if (rc)
			return srv_reject(c, rc, h->req_id, "bad APPEND_KV");
		break;
	}
	default:
		return srv_reject(c, -EOPNOTSUPP, h->req_id, "unknown opcode");
	}
	/* ATTEND and APPEND_KV: the bulk is small; receive it into our buffer. */
	if (ensure_bulk(c, h->bulk_len) || ensure_segs(c, 1))
		return srv_reject(c, -ENOMEM, h->req_id, "out of memory");
	c->segs[0] = (struct seg){c->bulk_buf, h->bulk_len};
	c->nsegs = 1;
	return 0;
}

static int srv_get(struct conn *c)
{
	struct tcp_server *s = c->srv;
	wire_header *h = &c->h;
	wire_blocks_view v;
	int rc = wire_decode_blocks_req(c->meta, h->meta_len, 0, 0, &s->opts.limits, &v);
	if (rc)
		return srv_reject(c, rc, h->req_id, "bad GET_BLOCKS");
	struct srv_frame *sf = srv_frame_new(c, wire_status_reply_size(v.n), v.n, v.n);
	if (!sf)
		return srv_reject(c, -ENOMEM, h->req_id, "out of memory");
	wire_buf wb = {.p = sf->f.meta, .cap = wire_status_reply_size(v.n)};
	wire_put_u32(&wb, 0);
	wire_put_u32(&wb, v.n);
	for (uint32_t i = 0; i < v.n; i++) {
		wire_block_ref r;
		wire_blocks_ref(&v, i, &r);
		const void *data = NULL;
		void *pin = NULL;
		uint64_t csum = 0;
		int st = s->h.get ? s->h.get(s->ctx, &r, &data, &pin, &csum) : -ENOSYS;
		if (st == 0 && !data) {
			st = -EIO;
			if (s->h.unpin)
				s->h.unpin(s->ctx, pin);
		}
		if (st == 0) {
			sf->csums[sf->f.nbulk] = csum;
			sf->f.bulk[sf->f.nbulk++] = (struct seg){data, r.len};
			sf->pins[sf->npins++] = pin;
		}
		wire_put_u32(&wb, wire_err_from_errno(st));
	}
	srv_send(c, sf, WIRE_OP_GET_BLOCKS, h->req_id, (uint32_t)wb.len);
	return 0;
}

/* A deferred ATTEND owns what the handler reads and writes: the request's
 * metadata and queries (taken from the connection, which allocates new ones
 * for the next frame), the output and the statuses. */
struct xport_attend_token {
	struct attend_tok_base b; /* first: xport_attend_complete reads it */
	struct xport_attend_token *next, *prev;
	struct conn *c; /* NULL once the connection died */
	wire_attend_view view; /* what the handler reads; points into meta */
	uint64_t req_id;
	uint32_t n_queries;
	uint8_t *meta;
	uint8_t *bulk;
	float *out;
	uint64_t out_bytes;
	int *st;
	struct srv_frame *sf;
};

static void attend_reply(struct conn *c, struct srv_frame *sf, uint64_t id, int rc, uint32_t n, const int *st,
			 float *out, uint64_t ob)
{
	wire_buf wb = {.p = sf->f.meta, .cap = wire_status_reply_size(n)};
	wire_put_u32(&wb, wire_err_from_errno(rc < 0 ? rc : 0));
	wire_put_u32(&wb, rc < 0 ? 0 : n);
	for (uint32_t i = 0; rc >= 0 && i < n; i++)
		wire_put_u32(&wb, wire_err_from_errno(st[i]));
	if (rc >= 0) {
		sf->f.bulk[0] = (struct seg){out, ob};
		sf->f.nbulk = 1;
		sf->owned = out;
	} else {
		free(out);
	}
	srv_send(c, sf, WIRE_OP_ATTEND, id, (uint32_t)wb.len);
}

static void token_free(struct xport_attend_token *t)
{
	free(t->meta);
	free(t->bulk);
	free(t->st);
	free(t);
}

/* On the loop thread: the deferred ATTEND finished. */
static void attend_done_fn(struct loop_task *task)
{
	struct xport_attend_token *t = (struct xport_attend_token *)task;
	struct conn *c = t->c;
	if (!c) { /* the connection died meanwhile */
		free(t->out);
		free(t->sf);
		token_free(t);
		return;
	}
	if (t->prev)
		t->prev->next = t->next;
	else
		c->deferred = t->next;
	if (t->next)
		t->next->prev = t->prev;
	attend_reply(c, t->sf, t->req_id, t->b.rc, t->n_queries, t->st, t->out, t->out_bytes);
	token_free(t);
	conn_write(c);
	if (c->dead)
		free_conn(c); /* closed by this write: outside srv_conn_cb, so free it here */
	else
		update_events(c);
}

/* Any backend's token: each starts with a struct attend_tok_base. */
void xport_attend_complete(xport_attend_token *t, int rc)
{
	struct attend_tok_base *b = (struct attend_tok_base *)(void *)t;
	b->rc = rc;
	loop_post(b->loop, &b->task);
}

static int srv_attend(struct conn *c)
{
	struct tcp_server *s = c->srv;
	wire_header *h = &c->h;
	wire_attend_view v;
	int rc = wire_decode_attend_req(c->meta, h->meta_len, h->bulk_len, &s->opts.limits, &v);
	if (rc)
		return srv_reject(c, rc, h->req_id, "bad ATTEND");
	if (!s->h.attend)
		return srv_reply_status(c, WIRE_OP_ATTEND, h->req_id, -ENOSYS, NULL, 0);
	uint64_t ob = wire_attend_reply_bulk(&v.shape, v.n_queries); /* bounded by the decoder */
	size_t ml = wire_status_reply_size(v.n_queries);
	struct srv_frame *sf = srv_frame_new(c, ml, 1, 0);
	int *st = calloc(v.n_queries, sizeof *st);
	float *out = aligned_alloc(64, (ob + 63) & ~(uint64_t)63);
	if (!sf || !st || !out) {
		free(sf);
		free(st);
		free(out);
		return srv_reject(c, -ENOMEM, h->req_id, "out of memory");
	}
	memset(out, 0, ob); /* failed queries' rows stay zero */
	float *o = out, *lse = out + (size_t)v.n_queries * v.shape.q_heads * v.shape.head_dim;
	struct xport_attend_token *t = calloc(1, sizeof *t);
	if (!t) {
		free(sf);
		free(st);
		free(out);
		return srv_reject(c, -ENOMEM, h->req_id, "out of memory");
	}
	*t = (struct xport_attend_token){.b = {.task.fn = attend_done_fn, .loop = c->loop}, .c = c, .req_id = h->req_id, .n_queries = v.n_queries, .out = out,
					 .out_bytes = ob, .st = st, .sf = sf};
	t->view = v;
	rc = s->h.attend(s->ctx, &t->view, (const float *)(const void *)c->bulk_buf, o, lse, st, t);
	if (rc == XPORT_DEFERRED) {
		/* Lend the metadata and queries to the token; the connection gets
		 * fresh buffers for its next frame. */
		t->meta = c->meta;
		t->bulk = c->bulk_buf;
		c->meta = NULL;
		c->meta_cap = 0;
		c->bulk_buf = NULL;
		c->bulk_cap = 0;
		t->next = c->deferred;
		if (c->deferred)
			c->deferred->prev = t;
		c->deferred = t;
		return 0;
	}
	attend_reply(c, sf, h->req_id, rc, v.n_queries, st, out, ob);
	free(st);
	free(t);
	return 0;
}

static int srv_on_done(struct conn *c, int bulk_ok)
{
	struct tcp_server *s = c->srv;
	wire_header *h = &c->h;
	s->st.frames_in++;
	if (h->opcode == WIRE_OP_PUT_BLOCKS) {
		for (uint32_t i = 0; i < c->nsegs; i++) {
			if (c->put_st[i] == 0 && s->h.put_commit) {
				wire_block_ref r;
				wire_blocks_view v = {.n = c->nsegs, .entries = c->meta + 8};
				wire_blocks_ref(&v, i, &r);
				uint64_t cs = bulk_ok && !(h->flags & WIRE_F_BULK_NOCSUM) ? c->seg_csum[i] : 0;
				c->put_st[i] = s->h.put_commit(s->ctx, &r, c->put_txn[i], bulk_ok ? 0 : -EBADMSG, cs);
			}
		}
		c->nsegs = 0;
		if (!bulk_ok)
			return srv_reject(c, -EBADMSG, h->req_id, "bulk checksum mismatch");
		srv_reply_status(c, WIRE_OP_PUT_BLOCKS, h->req_id, 0, c->put_st, (uint32_t)(h->meta_len - 8) / 20);
		goto flush;
	}
	if (!bulk_ok)
		return srv_reject(c, -EBADMSG, h->req_id, "bulk checksum mismatch");
	int32_t status;
	switch (h->opcode) {
	case WIRE_OP_HELLO: {
		wire_hello hl;
		if (wire_decode_hello(c->meta, h->meta_len, 0, &s->opts.limits, &status, &hl))
			return srv_reject(c, -EPROTO, h->req_id, "bad HELLO");
		if (hl.ver_min > WIRE_VERSION || hl.ver_max < WIRE_VERSION)
			return srv_reject(c, -EPROTONOSUPPORT, h->req_id, "no common version");
		/* Constant time: the reply's timing says nothing of how much matched. */
		if (s->auth_len && !kvm_auth_equal(hl.auth, hl.auth_len, s->auth, s->auth_len))
			return srv_reject(c, -EACCES, h->req_id, "missing or wrong authorization token");
		if (s->h.hello && s->h.hello(s->ctx, &hl))
			return srv_reject(c, -EACCES, h->req_id, "rejected");
		c->hello_done = 1;
		wire_hello me = {.node_id = s->opts.node_id, .caps = WIRE_CAP_TCP | (s->h.attend ? WIRE_CAP_ATTEND : 0),
				 .ver_min = WIRE_VERSION, .ver_max = WIRE_VERSION};
		struct srv_frame *sf = srv_frame_new(c, 4 + wire_hello_size(0), 0, 0);
		if (!sf)
			return srv_reject(c, -ENOMEM, h->req_id, "out of memory");
		wire_buf wb = {.p = sf->f.meta, .cap = 4 + wire_hello_size(0)};
		wire_encode_hello(&wb, 1, 0, &me);
		srv_send(c, sf, WIRE_OP_HELLO, h->req_id, (uint32_t)wb.len);
		break;
	}
	case WIRE_OP_PING: {
		uint64_t stamp;
		if (wire_decode_ping(c->meta, h->meta_len, 0, &status, &stamp))
			return srv_reject(c, -EPROTO, h->req_id, "bad PING");
		struct srv_frame *sf = srv_frame_new(c, 12, 0, 0);
		if (!sf)
			return srv_reject(c, -ENOMEM, h->req_id, "out of memory");
		wire_buf wb = {.p = sf->f.meta, .cap = 12};
		wire_encode_ping(&wb, 1, stamp);
		srv_send(c, sf, WIRE_OP_PING, h->req_id, 12);
		break;
	}
	case WIRE_OP_GET_BLOCKS:
		if (srv_get(c))
			return -1;
		break;
	case WIRE_OP_ATTEND:
		if (srv_attend(c))
			return -1;
		break;
	case WIRE_OP_APPEND_KV: {
		wire_append_view v;
		if (wire_decode_append_req(c->meta, h->meta_len, h->bulk_len, &s->opts.limits, &v))
			return srv_reject(c, -EPROTO, h->req_id, "bad APPEND_KV");
		if (ensure_put(c, v.n))
			return srv_reject(c, -ENOMEM, h->req_id, "out of memory");
		size_t off = 0;
		for (uint32_t i = 0; i < v.n; i++) {
			wire_append_ref r;
			wire_append_at(&v, i, &r);
			c->put_st[i] = s->h.append ? s->h.append(s->ctx, &r, c->bulk_buf + off, c->bulk_buf + off + r.bytes)
						   : -ENOSYS;
			off += 2 * (size_t)r.bytes;
		}
		srv_reply_status(c, WIRE_OP_APPEND_KV, h->req_id, 0, c->put_st, v.n);
		break;
	}
	default:
		return srv_reject(c, -EOPNOTSUPP, h->req_id, "unknown opcode");
	}
flush:
	conn_write(c);
	return c->dead ? -1 : 0;
}

static const struct rx_ops srv_rx = {srv_header_error, srv_on_meta, srv_on_done};

static void srv_conn_close(struct conn *c, int err)
{
	if (c->dead)
		return;
	struct tcp_server *s = c->srv;
	c->dead = 1;
	loop_del(c->loop, &c->src);
	close(c->src.fd);
	/* A PUT cut off mid-bulk: discard what was prepared. */
	if (c->rx_state == RX_BULK && c->h.opcode == WIRE_OP_PUT_BLOCKS && s->h.put_commit) {
		wire_blocks_view v = {.n = c->nsegs, .entries = c->meta + 8};
		for (uint32_t i = 0; i < c->nsegs; i++) {
			if (c->put_st[i] == 0) {
				wire_block_ref r;
				wire_blocks_ref(&v, i, &r);
				s->h.put_commit(s->ctx, &r, c->put_txn[i], err ? err : -ECONNRESET, 0);
			}
		}
	}
	while (c->txq) {
		struct txframe *f = c->txq;
		c->txq = f->next;
		f->done(f, err);
	}
	/* Deferred ATTENDs still computing: their replies are dropped. */
	for (struct xport_attend_token *t = c->deferred; t; t = t->next)
		t->c = NULL;
	c->deferred = NULL;
	if (c->prev)
		c->prev->next = c->next;
	else
		s->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	s->st.conns_closed++;
	if (s->accept_paused) {
		s->accept_paused = 0;
		loop_mod(s->loop, &s->src, EPOLLIN);
	}
	kvm_log(err == -ECONNRESET || err == 0 ? KVM_LOG_DEBUG : KVM_LOG_INFO, "xport_srv_conn_closed",
		"conn=%s err=\"%s\"", c->name, kvm_strerror(err));
	/* Freed by srv_conn_cb (or srv_close_fn) once nothing uses it. */
}

/* A closed server connection stays allocated (dead) until the end of its own
 * event callback, so no step of the callback touches freed memory. */
static void srv_conn_cb(struct loop_src *src, uint32_t ev)
{
	struct conn *c = (struct conn *)src;
	if (ev & EPOLLOUT)
		conn_write(c);
	if (!c->dead && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		conn_read(c, &srv_rx);
	if (c->dead)
		free_conn(c);
	else
		update_events(c);
}

static void accept_cb(struct loop_src *src, uint32_t ev)
{
	(void)ev;
	struct tcp_server *s = (struct tcp_server *)((char *)src - offsetof(struct tcp_server, src));
	for (int k = 0; k < 64; k++) {
		struct sockaddr_storage ss;
		socklen_t sl = sizeof ss;
		int fd = accept4(src->fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				/* The pending connection stays pending and the listener stays
				 * readable: stop watching it (no busy loop) until one of ours
				 * closes and frees a descriptor. */
				kvm_log(KVM_LOG_WARN, "xport_accept_paused", "err=\"%s\"", kvm_strerror(-errno));
				s->accept_paused = 1;
				loop_mod(s->loop, &s->src, 0);
			}
			return;
		}
		set_sockopts(fd, &s->opts);
		struct conn *c = calloc(1, sizeof *c);
		if (!c) {
			close(fd);
			return;
		}
		c->src.fd = fd;
		c->src.cb = srv_conn_cb;
		c->loop = s->loop;
		c->srv = s;
		snprintf(c->name, sizeof c->name, "srv%d", fd);
		c->events = EPOLLIN;
		if (loop_add(s->loop, &c->src, c->events)) {
			close(fd);
			free(c);
			return;
		}
		c->next = s->conns;
		if (s->conns)
			s->conns->prev = c;
		s->conns = c;
		s->st.conns_accepted++;
	}
}

int xport_tcp_listen(xport_loop *l, const char *host, uint16_t port, const xport_opts *o, const xport_handlers *h,
		     void *ctx, xport_server **out)
{
	int rc;
	if (!l || !h || !out)
		return -EINVAL;
	struct tcp_server *s = calloc(1, sizeof *s);
	if (!s)
		return -ENOMEM;
	s->pub.ops = &xport_tcp_ops;
	s->loop = l;
	s->h = *h;
	s->ctx = ctx;
	if (o)
		s->opts = *o;
	else
		xport_opts_default(&s->opts);
	if (take_token(&s->opts, s->auth, &s->auth_len)) {
		free(s);
		return -EINVAL;
	}
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai;
	char ps[8];
	snprintf(ps, sizeof ps, "%u", port);
	if (getaddrinfo(host, ps, &hints, &ai)) {
		rc = -EADDRNOTAVAIL;
		goto clean_srv;
	}
	int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		rc = -errno;
		goto clean_ai;
	}
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	/* Accepted sockets inherit the buffer sizes set before listen(). */
	set_sockopts(fd, &s->opts);
	if (bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, 128)) {
		rc = -errno;
		goto clean_fd;
	}
	struct sockaddr_storage ss;
	socklen_t sl = sizeof ss;
	getsockname(fd, (struct sockaddr *)&ss, &sl);
	s->pub.port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
						    : ((struct sockaddr_in *)&ss)->sin_port);
	s->src.fd = fd;
	s->src.cb = accept_cb;
	rc = loop_add(l, &s->src, EPOLLIN);
	if (rc)
		goto clean_fd;
	freeaddrinfo(ai);
	kvm_log(KVM_LOG_INFO, "xport_listening", "host=%s port=%u", host ? host : "*", s->pub.port);
	*out = &s->pub;
	return 0;
clean_fd:
	close(fd);
clean_ai:
	freeaddrinfo(ai);
clean_srv:
	free(s);
	return rc;
}

struct srv_task {
	struct loop_task t;
	struct tcp_server *s;
	xport_stats *st;
};

static void srv_close_fn(struct loop_task *t)
{
	struct tcp_server *s = ((struct srv_task *)t)->s;
	loop_del(s->loop, &s->src);
	close(s->src.fd);
	while (s->conns) {
		struct conn *c = s->conns;
		srv_conn_close(c, -ECANCELED);
		free_conn(c);
	}
}

static void tcp_server_close(xport_server *ps)
{
	struct tcp_server *s = (struct tcp_server *)ps;
	struct srv_task t = {.t.fn = srv_close_fn, .s = s};
	loop_run_sync(s->loop, &t.t);
	free(s);
}

static void srv_stats_fn(struct loop_task *t)
{
	struct srv_task *x = (struct srv_task *)t;
	*x->st = x->s->st;
}

static void tcp_server_stats(xport_server *ps, xport_stats *out)
{
	struct srv_task t = {.t.fn = srv_stats_fn, .s = (struct tcp_server *)ps, .st = out};
	loop_run_sync(t.s->loop, &t.t);
}

const struct xport_ops xport_tcp_ops = {
	.name = "tcp",
	.connect = xport_tcp_connect,
	.close = tcp_close,
	.get_blocks = tcp_get_blocks,
	.put_blocks = tcp_put_blocks,
	.attend = tcp_attend,
	.append = tcp_append,
	.ping = tcp_ping,
	.listen = xport_tcp_listen,
	.server_close = tcp_server_close,
	.server_stats = tcp_server_stats,
};
