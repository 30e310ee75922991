/* kvmesh data plane: one interface over several transports.
 *
 * A backend is a `static const struct xport_ops` table (TCP now:
 * xport_tcp_ops; RDMA verbs later as a second table). Callers use the
 * xport_* wrappers below, which dispatch through peer->ops.
 *
 * Threads and completion. An xport_loop owns one thread that reads every
 * socket of the peers and servers attached to it. Request functions may be
 * called from any thread: they validate, encode the request (and checksum its
 * bulk) and write it to a connection themselves, under the peer's lock (a
 * frame the socket cannot take at once is finished by the loop thread). They
 * return 0 when the request was accepted, in which case `cb(arg, status)`
 * runs exactly once, on the loop thread and never under a transport lock,
 * with 0 or a negative errno:
 *   -ETIMEDOUT     the deadline passed (the request may still run remotely)
 *   -ECONNRESET    the connection died before the reply (peer closed or
 *                  vanished mid-frame)
 *   -ENOTCONN      no live connection to the peer
 *   -ECANCELED     the peer was closed locally
 *   -EBADMSG       the reply's checksum did not match
 *   -EPROTO        the peer broke the protocol
 *   or the error the remote handler returned (wire_err_to_errno).
 * A negative return means the request was not accepted and cb never runs
 * (-EINVAL, -EMSGSIZE: what the peer's decoder would refuse is refused here,
 * so it cannot cost the connection; -ECANCELED: the peer is closing).
 * Callbacks must not block; they may submit further requests to any peer,
 * but must not close a peer or a server.
 *
 * Ownership. Every array and buffer passed to a request (the xport_block_io
 * array, block buffers, queries, o/lse outputs) is the caller's and must stay
 * valid until cb has run; bulk bytes are read and written in place with
 * readv/writev (no intermediate copy). Per-entry results are written into the
 * caller's array before cb runs. */
#ifndef KVMESH_TRANSPORT_TRANSPORT_H
#define KVMESH_TRANSPORT_TRANSPORT_H

#include <stdint.h>

#include "transport/wire.h"

typedef struct xport_loop xport_loop;
typedef struct xport_peer xport_peer;
typedef struct xport_server xport_server;

/* Creates a loop and starts its thread. *out is the caller's:
 * xport_loop_destroy, after every peer and server on it is closed. */
int xport_loop_create(xport_loop **out);
void xport_loop_destroy(xport_loop *l);

typedef void (*xport_cb)(void *arg, int status);

/* A deferred ATTEND (see xport_handlers.attend). */
typedef struct xport_attend_token xport_attend_token;
#define XPORT_DEFERRED 1
/* Finishes a deferred ATTEND with rc (0 or a negative errno): its reply is
 * sent (or dropped if the connection died meanwhile) and the token and the
 * buffers it lent are freed. Thread-safe; exactly once per deferral. */
void xport_attend_complete(xport_attend_token *tok, int rc);

typedef struct xport_opts {
	uint64_t node_id;            /* sent in HELLO */
	uint32_t n_conns;            /* connections per peer (default 2) */
	uint32_t max_inflight;       /* requests in flight per connection (default 512) */
	uint32_t sockbuf_bytes;      /* SO_SNDBUF / SO_RCVBUF (default 4 MiB) */
	uint32_t connect_timeout_ms; /* connect + HELLO (default 3000) */
	uint32_t tx_backlog_bytes;   /* server: stop reading while more replies than this wait (64 MiB) */
	int bulk_checksum;           /* 1 (default): checksum bulk bytes; 0: WIRE_F_BULK_NOCSUM */
	wire_limits limits;          /* applied to everything received */
	/* The cluster's shared token (common/auth.h), NUL-terminated; NULL or
	 * "": none. A client sends it in HELLO's auth field; a server with one
	 * refuses a HELLO without exactly these bytes with ERROR DENIED and
	 * closes (the client's connect fails with -EACCES). Copied at
	 * connect/listen; at most min(KVM_AUTH_TOKEN_MAX, limits.max_msg) bytes. */
	const char *auth_token;
} xport_opts;
void xport_opts_default(xport_opts *o);

/* One block range of a GET_BLOCKS or PUT_BLOCKS batch. buf is the
 * destination (get) or source (put) of len bytes; status is written with
 * the entry's result (0, -ENOENT, -ESTALE, -ERANGE, ...).
 * csum: PUT: the XXH3-64 of the len bytes if the caller already has it (a
 * store keeps one per immutable block), else 0 and it is computed here;
 * GET: written with the verified XXH3-64 of the bytes received (0 when the
 * sender sent no bulk checksum), so the caller can keep it. */
typedef struct xport_block_io {
	wire_block_ref ref;
	void *buf;
	uint64_t csum;
	int status;
} xport_block_io;

/* One query of an ATTEND batch: q is [q_heads][head_dim] fp32; the reply is
 * written to o [q_heads][head_dim] and lse [q_heads]. */
typedef struct xport_attend_query {
	uint32_t n_tokens;
	uint32_t n_blocks;
	const wire_handle *blocks; /* this peer's blocks of the sequence, in order */
	const float *q;
	float *o;
	float *lse;
	int status;
} xport_attend_query;

/* One APPEND_KV entry: k and v are ref.bytes bytes each. */
typedef struct xport_append_io {
	wire_append_ref ref;
	const void *k;
	const void *v;
	int status;
} xport_append_io;

/* Server-side handlers, supplied by the caller (the node agent: kvstore and
 * kernels). They run on the server's loop thread and must not block for
 * long. A NULL handler answers its operation with WIRE_E_NOTSUP. They return
 * 0 or a negative errno, which travels as a wire code. */
typedef struct xport_handlers {
	/* A peer said HELLO; nonzero rejects it (the connection is closed). */
	int (*hello)(void *ctx, const wire_hello *h);
	/* GET: points *data at ref->len bytes at ref->offset of the block. The
	 * bytes must stay valid and unchanged until unpin(ctx, *pin) (after the
	 * reply has been written or the connection died). *csum is 0 on entry;
	 * a store that keeps the XXH3-64 of exactly these bytes (a whole
	 * immutable block) sets it, and the bytes are not hashed again. */
	int (*get)(void *ctx, const wire_block_ref *ref, const void **data, void **pin, uint64_t *csum);
	void (*unpin)(void *ctx, void *pin);
	/* PUT: returns in *dst where ref->len bytes may be received, not yet
	 * visible to readers. Once the whole frame has arrived, put_commit runs
	 * with status 0 (checksum verified: publish) or a negative errno (discard:
	 * nothing stored may change). put_commit runs once for every successful
	 * put_prepare. csum is the verified XXH3-64 of the entry's bytes (0 if
	 * the sender sent no bulk checksum), for the store to keep. */
	int (*put_prepare)(void *ctx, const wire_block_ref *ref, void **dst, void **txn);
	int (*put_commit)(void *ctx, const wire_block_ref *ref, void *txn, int status, uint64_t csum);
	/* ATTEND: q is [n_queries][q_heads][head_dim]; write o
	 * [n_queries][q_heads][head_dim] and lse [n_queries][q_heads] (the layout
	 * of da_partial_cpu) and per-query statuses st[n_queries] (0 or -errno).
	 * Return 0 (done), a negative errno (fails the whole batch), or
	 * XPORT_DEFERRED: the kernel runs elsewhere (the agent's worker threads),
	 * v, q, o, lse and st stay valid and untouched by the transport until the
	 * handler calls xport_attend_complete(tok, rc) from any thread; the loop
	 * meanwhile serves other requests. */
	int (*attend)(void *ctx, const wire_attend_view *v, const float *q, float *o, float *lse, int *st,
		      xport_attend_token *tok);
	/* APPEND_KV: one entry, k and v of ref->bytes bytes each (valid during
	 * the call only). Runs only after the frame's checksums were verified. */
	int (*append)(void *ctx, const wire_append_ref *ref, const void *k, const void *v);
} xport_handlers;

/* Per-transport counters (read with xport_server_stats). */
typedef struct xport_stats {
	uint64_t frames_in, frames_out, bytes_in, bytes_out;
	uint64_t proto_errors; /* frames rejected: malformed, limits, checksum */
	uint64_t conns_accepted, conns_closed;
} xport_stats;

/* A backend. connect/listen are called through the wrappers below. */
struct xport_ops {
	const char *name;
	int (*connect)(xport_loop *l, const char *host, uint16_t port, const xport_opts *o, xport_peer **out);
	void (*close)(xport_peer *p);
	int (*get_blocks)(xport_peer *p, xport_block_io *b, uint32_t n, uint32_t timeout_ms, xport_cb cb,
			  void *arg);
	int (*put_blocks)(xport_peer *p, xport_block_io *b, uint32_t n, uint32_t timeout_ms, xport_cb cb,
			  void *arg);
	int (*attend)(xport_peer *p, const wire_shape *s, xport_attend_query *q, uint32_t n,
		      uint32_t timeout_ms, xport_cb cb, void *arg);
	int (*append)(xport_peer *p, xport_append_io *a, uint32_t n, uint32_t timeout_ms, xport_cb cb,
		      void *arg);
	int (*ping)(xport_peer *p, uint32_t timeout_ms, xport_cb cb, void *arg);
	int (*listen)(xport_loop *l, const char *host, uint16_t port, const xport_opts *o,
		      const xport_handlers *h, void *ctx, xport_server **out);
	void (*server_close)(xport_server *s);
	void (*server_stats)(xport_server *s, xport_stats *out);
};

/* The public head of every backend's peer and server object (embedded first
 * in the private struct, as rdma-core does). */
struct xport_peer {
	const struct xport_ops *ops;
	uint64_t remote_node_id; /* from the peer's HELLO */
	uint64_t remote_caps;
};
struct xport_server {
	const struct xport_ops *ops;
	uint16_t port; /* the bound port (useful with port 0) */
};

extern const struct xport_ops xport_tcp_ops;

/* TCP backend entry points (also reachable through xport_tcp_ops).
 * connect opens o->n_conns connections to host:port (numeric IPv4/IPv6 or a
 * name), says HELLO on each, and returns a peer owned by the caller
 * (xport_close). listen binds host:port (port 0: any; see s->port) and
 * dispatches to h with ctx; the server is the caller's (xport_server_close). */
int xport_tcp_connect(xport_loop *l, const char *host, uint16_t port, const xport_opts *o, xport_peer **out);
int xport_tcp_listen(xport_loop *l, const char *host, uint16_t port, const xport_opts *o,
		     const xport_handlers *h, void *ctx, xport_server **out);

/* Dispatching wrappers. */
int xport_connect(const struct xport_ops *ops, xport_loop *l, const char *host, uint16_t port,
		  const xport_opts *o, xport_peer **out);
/* A connection that dies is not re-dialled: its requests fail, later ones go
 * to the peer's other connections, and once none is left they fail with
 * -ENOTCONN; close the peer and connect again (the agent's heartbeat decides
 * when). */

/* Fails every pending request with -ECANCELED (their callbacks run before
 * this returns), closes the connections and frees the peer. Not from a
 * callback, and not while another thread submits to the same peer. */
void xport_close(xport_peer *p);
int xport_get_blocks(xport_peer *p, xport_block_io *b, uint32_t n, uint32_t timeout_ms, xport_cb cb, void *arg);
int xport_put_blocks(xport_peer *p, xport_block_io *b, uint32_t n, uint32_t timeout_ms, xport_cb cb, void *arg);
int xport_attend(xport_peer *p, const wire_shape *s, xport_attend_query *q, uint32_t n, uint32_t timeout_ms,
		 xport_cb cb, void *arg);
int xport_append(xport_peer *p, xport_append_io *a, uint32_t n, uint32_t timeout_ms, xport_cb cb, void *arg);
int xport_ping(xport_peer *p, uint32_t timeout_ms, xport_cb cb, void *arg);
int xport_listen(const struct xport_ops *ops, xport_loop *l, const char *host, uint16_t port,
		 const xport_opts *o, const xport_handlers *h, void *ctx, xport_server **out);
/* Closes the listener and every accepted connection (pins are released). */
void xport_server_close(xport_server *s);
void xport_server_stats(xport_server *s, xport_stats *out);

/* A completion object for callers who want to block: count requests in,
 * pass xport_waiter_cb with the waiter as arg, then wait for all of them.
 * first_error keeps the first nonzero status. */
typedef struct xport_waiter {
	_Alignas(64) unsigned char opaque[128];
} xport_waiter;
void xport_waiter_init(xport_waiter *w);
void xport_waiter_add(xport_waiter *w, uint32_t n);
void xport_waiter_cb(void *w, int status);
/* Waits until every added request completed; returns the first error or 0
 * and resets the first error. */
int xport_waiter_wait(xport_waiter *w);
void xport_waiter_destroy(xport_waiter *w);

#endif
