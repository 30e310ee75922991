/* A small wrapper around gRPC's C core: servers with registered unary and
 * server-streaming methods, and client channels. Every gRPC call of the
 * project goes through here, since the C core's API changes between minor
 * releases (pinned to Debian 12's 1.51). Messages are opaque bytes: callers
 * pack and unpack them with protobuf-c.
 *
 * Functions return 0 or a negative errno code unless said otherwise; gRPC
 * status codes (GRPC_STATUS_*, 0 = OK) are reported separately, in
 * kvm_rpc_status or as a handler's return value. */
#ifndef KVMESH_COMMON_RPC_H
#define KVMESH_COMMON_RPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/metrics.h"

/* gRPC status codes used by handlers (the same numbers as grpc_status_code). */
enum {
	KVM_RPC_OK = 0,
	KVM_RPC_CANCELLED = 1,
	KVM_RPC_UNKNOWN = 2,
	KVM_RPC_INVALID_ARGUMENT = 3,
	KVM_RPC_DEADLINE_EXCEEDED = 4,
	KVM_RPC_NOT_FOUND = 5,
	KVM_RPC_ALREADY_EXISTS = 6,
	KVM_RPC_PERMISSION_DENIED = 7,
	KVM_RPC_RESOURCE_EXHAUSTED = 8,
	KVM_RPC_FAILED_PRECONDITION = 9,
	KVM_RPC_ABORTED = 10,
	KVM_RPC_OUT_OF_RANGE = 11,
	KVM_RPC_UNIMPLEMENTED = 12,
	KVM_RPC_INTERNAL = 13,
	KVM_RPC_UNAVAILABLE = 14,
	KVM_RPC_UNAUTHENTICATED = 16,
};

/* A unary handler's return value when it will end the call later with
 * kvm_rpc_finish (not a gRPC status). */
#define KVM_RPC_DEFERRED (-1)

/* kvm_rpc_server_add_method flags. A unary handler runs on a pool worker,
 * unless KVM_RPC_INLINE says that it never blocks for long (no disk sync, no
 * wait on another node; a short lock is fine): it then runs on the thread that
 * took the call from gRPC's queue, with no hand-off, the fastest path, and
 * kvm_rpc_cancelled is always false in it. */
enum {
	KVM_RPC_UNARY = 0,
	KVM_RPC_STREAMING = 1, /* a server stream: runs on a thread of its own */
	KVM_RPC_INLINE = 2,
};

#define KVM_RPC_MAX_MESSAGE (64 * 1024 * 1024)

typedef struct kvm_rpc_status {
	int code;          /* KVM_RPC_* */
	char message[512]; /* the peer's status message, NUL-terminated */
} kvm_rpc_status;

/* ---- Server ------------------------------------------------------------------ */

typedef struct kvm_rpc_server kvm_rpc_server;
/* One incoming call, valid while its handler runs. */
typedef struct kvm_rpc_call kvm_rpc_call;

/* Runs with the request message (not owned; valid during the handler; a NUL
 * byte follows it, not counted in len), on a server thread, a pool worker or a
 * thread of its own (see the flags). A unary handler answers with
 * kvm_rpc_reply once; a streaming one sends with kvm_rpc_send any number of
 * times. Returns the call's status code (KVM_RPC_OK, or e.g. the value of
 * kvm_rpc_fail), or, for a unary call, KVM_RPC_DEFERRED: the handler (or
 * whoever it handed `call` to) ends the call later with kvm_rpc_finish. */
typedef int (*kvm_rpc_handler)(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);

/* Creates a server listening on addr ("127.0.0.1:0" picks a port, returned in
 * *port when port is not NULL). A port already in use fails with -EADDRINUSE
 * (SO_REUSEPORT is off). *out is owned by the caller: kvm_rpc_server_destroy. */
int kvm_rpc_server_create(const char *addr, int *port, kvm_rpc_server **out);

/* Registers a method ("/package.Service/Method") before start, with
 * KVM_RPC_UNARY, KVM_RPC_STREAMING or KVM_RPC_UNARY | KVM_RPC_INLINE. The
 * server keeps pointers to neither string after the call. */
int kvm_rpc_server_add_method(kvm_rpc_server *srv, const char *method, unsigned flags,
			      kvm_rpc_handler fn, void *arg);

/* Requires every call to present `authorization: Bearer <token>` metadata
 * (before start; the token is copied; NULL or "" requires none). A call
 * without it, or with another token, gets UNAUTHENTICATED "missing or wrong
 * authorization token" before its request is read or any handler runs; the
 * token is compared in constant time. The health service
 * (/grpc.health.v1.Health/...) stays open, for probes that carry no token.
 * -E2BIG for a token over KVM_AUTH_TOKEN_MAX (common/auth.h). */
int kvm_rpc_server_set_token(kvm_rpc_server *srv, const char *token);

int kvm_rpc_server_start(kvm_rpc_server *srv);

/* A kvm_metrics_collector (arg: the server): per method, calls started,
 * ended per status code (grpc_server_handled_total: bad input shows as
 * InvalidArgument) and unary calls' handling time, named as grpc-go's
 * Prometheus interceptors name them. Stop the metrics endpoint before
 * destroying the server. */
void kvm_rpc_server_collect(void *srv, kvm_metrics_out *out);

/* Stops accepting calls, lets running calls finish for up to grace_ms, then
 * cancels the rest and waits for their handlers to return and every deferred
 * call to be finished; frees the server. */
void kvm_rpc_server_destroy(kvm_rpc_server *srv, int grace_ms);

/* Sets the unary response (copied). Returns -EALREADY on a second call. */
int kvm_rpc_reply(kvm_rpc_call *call, const void *msg, size_t len);

/* Ends a unary call whose handler returned KVM_RPC_DEFERRED, from any thread,
 * once: with the response set by kvm_rpc_reply when code is KVM_RPC_OK, else
 * with code and the message of kvm_rpc_fail. `call` is gone after it. Also
 * valid on a cancelled call (nothing is then sent). */
void kvm_rpc_finish(kvm_rpc_call *call, int code);

/* Sends one message of a server stream (copied), waiting until gRPC took it.
 * Returns -ECANCELED when the client went away or the server is stopping. */
int kvm_rpc_send(kvm_rpc_call *call, const void *msg, size_t len);

/* Sets the status message and returns `code`, so that a handler can end with
 * `return kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "no node %s", id);` */
int kvm_rpc_fail(kvm_rpc_call *call, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* True once the client cancelled, its deadline passed, or the server stops:
 * long-running handlers check it while they wait. */
bool kvm_rpc_cancelled(kvm_rpc_call *call);

/* The value of request metadata `key` (e.g. "authorization"), copied into
 * buf (NUL-terminated, truncated to cap); NULL when absent. */
const char *kvm_rpc_metadata(kvm_rpc_call *call, const char *key, char *buf, size_t cap);

/* ---- Client ------------------------------------------------------------------ */

typedef struct kvm_rpc_channel kvm_rpc_channel;

/* Opens an insecure channel to target ("host:port"); connection happens
 * lazily. *out is owned by the caller: kvm_rpc_channel_close. */
int kvm_rpc_channel_open(const char *target, kvm_rpc_channel **out);
void kvm_rpc_channel_close(kvm_rpc_channel *ch);
/* Sends `authorization: Bearer <token>` on every later call of the channel,
 * unary and streaming (the token is copied; NULL or "" sends none). Not
 * while other threads call through the channel. */
int kvm_rpc_channel_set_token(kvm_rpc_channel *ch, const char *token);

/* A unary call with a deadline of timeout_ms. Returns 0 once the call ended,
 * with st->code the gRPC status; on KVM_RPC_OK, *resp (malloc'd, caller
 * frees, NUL-terminated beyond *resp_len) and *resp_len hold the response. Negative errno for local failures. */
int kvm_rpc_unary(kvm_rpc_channel *ch, const char *method, const void *req, size_t len,
		  int timeout_ms, void **resp, size_t *resp_len, kvm_rpc_status *st);

/* Asynchronous unary calls, for a client that keeps many calls in flight
 * from few threads: calls started on a queue end there, in any order. */
typedef struct kvm_rpc_queue kvm_rpc_queue;

int kvm_rpc_queue_create(kvm_rpc_queue **out);
/* Starts a unary call whose end kvm_rpc_queue_next reports once, with `tag`.
 * The request is copied. -EIO if gRPC refused to start it. */
int kvm_rpc_unary_start(kvm_rpc_channel *ch, kvm_rpc_queue *q, const char *method,
			const void *req, size_t len, int timeout_ms, void *tag);
/* Waits up to timeout_ms (< 0: no limit) for a call of the queue to end.
 * Returns 1 with its *tag, and *resp, *resp_len and *st as kvm_rpc_unary
 * fills them; 0 when none ended in time; a negative errno when the call
 * ended without a status (*tag is then set) or on bad arguments. */
int kvm_rpc_queue_next(kvm_rpc_queue *q, int timeout_ms, void **tag, void **resp,
		       size_t *resp_len, kvm_rpc_status *st);
/* Cancels the calls still in flight, waits for them, and frees the queue;
 * their results are dropped. */
void kvm_rpc_queue_destroy(kvm_rpc_queue *q);

typedef struct kvm_rpc_stream kvm_rpc_stream;

/* Starts a server-streaming call; timeout_ms <= 0 means no deadline. */
int kvm_rpc_stream_open(kvm_rpc_channel *ch, const char *method, const void *req, size_t len,
			int timeout_ms, kvm_rpc_stream **out);
/* Waits for the next message: returns 1 with *msg (malloc'd, caller frees),
 * 0 when the stream ended (see kvm_rpc_stream_status), or a negative errno. */
int kvm_rpc_stream_next(kvm_rpc_stream *s, void **msg, size_t *len);
const kvm_rpc_status *kvm_rpc_stream_status(const kvm_rpc_stream *s);
/* Cancels the call if still running, and frees the stream. */
void kvm_rpc_stream_close(kvm_rpc_stream *s);

#endif
