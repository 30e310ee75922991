/* gRPC C core wrapper. See rpc.h for the contract.
 *
 * Server: a few threads (as many as cores) wait on the server's completion
 * queue. A new unary call is answered from that queue: its handler runs on
 * the thread that took it (KVM_RPC_INLINE) or on a pool worker, and its final
 * batch is started without waiting; the queue reports when it went out and
 * when the call ended, and the second of the two frees the call. So a quick
 * call costs no thread hand-off, and a deferred one (kvm_rpc_finish) holds no
 * thread at all while it waits. A streaming call runs on a thread of its own
 * with a pluck queue, so that its sends are plain blocking steps (the pattern
 * of gRPC's Ruby extension). One request per registered method is always
 * outstanding: a new one is posted as each call arrives. */
#include "common/rpc.h"

#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/auth.h"
#include "common/log.h"
#include "common/metrics.h"

/* ---- Helpers ----------------------------------------------------------------- */

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static gpr_timespec deadline_in(int ms)
{
	if (ms <= 0)
		return gpr_inf_future(GPR_CLOCK_REALTIME);
	return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

/* Copies a byte buffer into one malloc'd block with a NUL byte after the
 * message (not counted in *len), so text payloads are C strings. */
static int buffer_to_bytes(grpc_byte_buffer *bb, void **out, size_t *len)
{
	grpc_byte_buffer_reader r;
	if (!grpc_byte_buffer_reader_init(&r, bb))
		return -EIO;
	grpc_slice s = grpc_byte_buffer_reader_readall(&r);
	grpc_byte_buffer_reader_destroy(&r);
	size_t n = GRPC_SLICE_LENGTH(s);
	char *p = malloc(n + 1);
	if (!p) {
		grpc_slice_unref(s);
		return -ENOMEM;
	}
	memcpy(p, GRPC_SLICE_START_PTR(s), n);
	p[n] = '\0';
	grpc_slice_unref(s);
	*out = p;
	*len = n;
	return 0;
}

static grpc_byte_buffer *bytes_to_buffer(const void *msg, size_t len)
{
	grpc_slice s = grpc_slice_from_copied_buffer(msg, len);
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
	grpc_slice_unref(s);
	return bb;
}

/* The message size limits both ends use (args[0..1]). */
static void message_limits(grpc_arg *args)
{
	args[0] = (grpc_arg){.type = GRPC_ARG_INTEGER,
			     .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
			     .value.integer = KVM_RPC_MAX_MESSAGE};
	args[1] = (grpc_arg){.type = GRPC_ARG_INTEGER,
			     .key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH,
			     .value.integer = KVM_RPC_MAX_MESSAGE};
}

static void copy_status(kvm_rpc_status *st, grpc_status_code code, grpc_slice details)
{
	st->code = (int)code;
	size_t n = GRPC_SLICE_LENGTH(details);
	if (n >= sizeof(st->message))
		n = sizeof(st->message) - 1;
	memcpy(st->message, GRPC_SLICE_START_PTR(details), n);
	st->message[n] = '\0';
}

/* Shuts down and destroys a pluck queue, draining its shutdown event. */
static void destroy_pluck_cq(grpc_completion_queue *cq)
{
	grpc_completion_queue_shutdown(cq);
	grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	grpc_completion_queue_destroy(cq);
}

/* Runs one batch on a pluck queue and waits for it. Returns the batch's
 * success flag, or 0 if it could not start. */
static int run_batch(grpc_call *call, grpc_completion_queue *cq, const grpc_op *ops, size_t n,
		     void *tag)
{
	if (grpc_call_start_batch(call, ops, n, tag, NULL) != GRPC_CALL_OK)
		return 0;
	grpc_event ev = grpc_completion_queue_pluck(cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	return ev.type == GRPC_OP_COMPLETE && ev.success;
}

/* ---- Server ------------------------------------------------------------------ */

#define RPC_WORKERS 16
#define RPC_MAX_CQ_THREADS 8

#define N_CODES 17 /* gRPC status codes 0..16 */

typedef struct method {
	char *name;
	void *handle;
	unsigned flags; /* KVM_RPC_STREAMING, KVM_RPC_INLINE */
	kvm_rpc_handler fn;
	void *arg;
	struct method *next;
	/* For /metrics, with relaxed atomics: calls begun, ended per status
	 * code, and (unary) their time from arrival to the final batch. */
	uint64_t started, handled[N_CODES];
	kvm_histogram latency;
} method;

typedef struct pending pending;

/* What an event on the server's queue is about: each pending call has one
 * tag per kind of event it can get. */
typedef enum { TAG_ARRIVED, TAG_CLOSED, TAG_DONE } tag_kind;
typedef struct call_tag {
	tag_kind kind;
	pending *p;
} call_tag;

struct kvm_rpc_call {
	pending *p;
	bool initial_md_sent, replied, closed;
	atomic_bool cancelled;
	int close_cancelled; /* filled by RECV_CLOSE_ON_SERVER */
	void *reply;
	size_t reply_len;
	char message[512];
};

/* One outstanding request for a method; becomes a call when it arrives. */
struct pending {
	struct pending *next; /* in the server's work queue */
	method *m;            /* NULL: a call to a method nobody registered */
	grpc_call_details details;
	kvm_rpc_server *srv;
	grpc_call *call;
	gpr_timespec deadline;
	grpc_metadata_array md;
	grpc_byte_buffer *payload;
	/* Streaming calls and refusals run as blocking steps on a pluck queue
	 * of their own; unary calls run on the server's queue (cq NULL). */
	grpc_completion_queue *cq;
	call_tag arrived, closed, done;
	atomic_int refs; /* a unary call's events still to come (close, done) */
	kvm_rpc_call c;
	/* The final batch's buffers, alive until it completes. */
	bool close_in_final; /* RECV_CLOSE_ON_SERVER rides in the final batch */
	grpc_byte_buffer *reply_bb;
	grpc_slice details_slice;
	bool has_details;
	uint64_t arrived_ns; /* CLOCK_MONOTONIC */
};

struct kvm_rpc_server {
	grpc_server *server;
	grpc_completion_queue *cq;
	method *methods;
	bool started;

	pthread_mutex_t mu;
	pthread_cond_t cv;
	unsigned active_calls;
	bool shutdown_done;

	/* Threads that wait on the server's queue: they take new calls, run
	 * KVM_RPC_INLINE handlers and finish calls. As many as cores: more
	 * only wake each other. */
	pthread_t cq_threads[RPC_MAX_CQ_THREADS];
	unsigned n_cq_threads;

	/* Other unary handlers, which may block (a large copy, a wait on
	 * another node), run on a fixed pool of workers, so that they never
	 * hold up the queue; streaming calls, which may last, get a thread
	 * each. */
	pthread_t workers[RPC_WORKERS];
	unsigned n_workers;
	pthread_cond_t work_cv;
	struct pending *queue_head, *queue_tail;
	bool stopping;

	/* "Bearer <token>" that calls must present (auth_len 0: none). */
	char *auth;
	size_t auth_len;

	uint64_t unknown_calls; /* to methods nobody registered (atomic) */
};

static char shutdown_tag;

static void *stream_main(void *arg);
static void run_unary(pending *p);

static void *worker_main(void *arg)
{
	kvm_rpc_server *srv = arg;
	pthread_mutex_lock(&srv->mu);
	for (;;) {
		while (!srv->queue_head && !srv->stopping)
			pthread_cond_wait(&srv->work_cv, &srv->mu);
		if (!srv->queue_head)
			break; /* stopping, and nothing left */
		pending *p = srv->queue_head;
		srv->queue_head = p->next;
		if (!srv->queue_head)
			srv->queue_tail = NULL;
		pthread_mutex_unlock(&srv->mu);
		run_unary(p);
		pthread_mutex_lock(&srv->mu);
	}
	pthread_mutex_unlock(&srv->mu);
	return NULL;
}

static int request_call(kvm_rpc_server *srv, method *m)
{
	pending *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->m = m;
	p->srv = srv;
	p->c.p = p;
	p->arrived = (call_tag){TAG_ARRIVED, p};
	p->closed = (call_tag){TAG_CLOSED, p};
	p->done = (call_tag){TAG_DONE, p};
	grpc_metadata_array_init(&p->md);
	grpc_call_details_init(&p->details);
	if (!m || (m->flags & KVM_RPC_STREAMING))
		p->cq = grpc_completion_queue_create_for_pluck(NULL);
	grpc_call_error err =
		m ? grpc_server_request_registered_call(srv->server, m->handle, &p->call,
							&p->deadline, &p->md, &p->payload,
							p->cq ? p->cq : srv->cq, srv->cq, &p->arrived)
		  : grpc_server_request_call(srv->server, &p->call, &p->details, &p->md, p->cq,
					     srv->cq, &p->arrived);
	if (err != GRPC_CALL_OK) {
		grpc_call_details_destroy(&p->details);
		grpc_metadata_array_destroy(&p->md);
		if (p->cq)
			destroy_pluck_cq(p->cq);
		free(p);
		return -EIO;
	}
	return 0;
}

static void free_pending(pending *p)
{
	if (p->call)
		grpc_call_unref(p->call);
	if (p->payload)
		grpc_byte_buffer_destroy(p->payload);
	if (p->reply_bb)
		grpc_byte_buffer_destroy(p->reply_bb);
	if (p->has_details)
		grpc_slice_unref(p->details_slice);
	free(p->c.reply);
	grpc_call_details_destroy(&p->details);
	grpc_metadata_array_destroy(&p->md);
	if (p->cq)
		destroy_pluck_cq(p->cq);
	free(p);
}

/* A call is over: its pending goes and the server may finish stopping. */
static void end_call(pending *p)
{
	kvm_rpc_server *srv = p->srv;
	free_pending(p);
	pthread_mutex_lock(&srv->mu);
	srv->active_calls--;
	pthread_cond_broadcast(&srv->cv);
	pthread_mutex_unlock(&srv->mu);
}

static void unref_unary(pending *p)
{
	if (atomic_fetch_sub(&p->refs, 1) == 1)
		end_call(p);
}

#define HEALTH_PREFIX "/grpc.health.v1.Health/"
#define AUTH_DENIED "missing or wrong authorization token"

/* Whether a call may run: the server has no token, the method is the health
 * service (probes carry no token), or the call's `authorization` metadata is
 * "Bearer <token>" (compared in constant time). */
static bool call_authorized(const kvm_rpc_server *srv, const pending *p, const char *method,
			    size_t method_len)
{
	if (!srv->auth_len)
		return true;
	size_t hl = sizeof(HEALTH_PREFIX) - 1;
	if (method_len > hl && memcmp(method, HEALTH_PREFIX, hl) == 0)
		return true;
	bool ok = false, sent = false;
	for (size_t i = 0; i < p->md.count && !sent; i++) {
		const grpc_metadata *m = &p->md.metadata[i];
		if (GRPC_SLICE_LENGTH(m->key) == 13 &&
		    memcmp(GRPC_SLICE_START_PTR(m->key), "authorization", 13) == 0) {
			sent = true;
			ok = kvm_auth_equal(GRPC_SLICE_START_PTR(m->value), GRPC_SLICE_LENGTH(m->value),
					    srv->auth, srv->auth_len);
		}
	}
	if (!ok) { /* who knocked, for the operator; never what they sent */
		char *peer = grpc_call_get_peer(p->call);
		kvm_log(KVM_LOG_WARN, "rpc_unauthenticated", "method=%.*s peer=%s token=%s",
			(int)(method_len < 200 ? method_len : 200), method, peer ? peer : "?",
			sent ? "wrong" : "missing");
		gpr_free(peer);
	}
	return ok;
}

/* Answers a call to an unregistered method with UNIMPLEMENTED (or, without
 * the token, UNAUTHENTICATED: which methods exist is not for strangers). */
static void refuse_unknown(pending *p)
{
	char msg[300];
	grpc_status_code code = GRPC_STATUS_UNIMPLEMENTED;
	if (!call_authorized(p->srv, p, (const char *)GRPC_SLICE_START_PTR(p->details.method),
			     GRPC_SLICE_LENGTH(p->details.method))) {
		code = GRPC_STATUS_UNAUTHENTICATED;
		snprintf(msg, sizeof(msg), AUTH_DENIED);
	} else {
		snprintf(msg, sizeof(msg), "unknown method %.*s",
			 (int)GRPC_SLICE_LENGTH(p->details.method),
			 (const char *)GRPC_SLICE_START_PTR(p->details.method));
	}
	grpc_slice details = grpc_slice_from_copied_string(msg);
	int cancelled = 0;
	grpc_op ops[3];
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[1].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[1].data.send_status_from_server.status = code;
	ops[1].data.send_status_from_server.status_details = &details;
	ops[2].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
	ops[2].data.recv_close_on_server.cancelled = &cancelled;
	run_batch(p->call, p->cq, ops, 3, p);
	grpc_slice_unref(details);
}

/* A new call of a registered method: streaming ones get a thread; unary ones
 * start watching for their end, then run here (KVM_RPC_INLINE) or on a pool
 * worker. */
static void call_arrived(kvm_rpc_server *srv, pending *p)
{
	p->arrived_ns = now_ns();
	__atomic_fetch_add(&p->m->started, 1, __ATOMIC_RELAXED);
	pthread_mutex_lock(&srv->mu);
	srv->active_calls++;
	pthread_mutex_unlock(&srv->mu);
	if (p->m->flags & KVM_RPC_STREAMING) {
		pthread_t t;
		pthread_attr_t attr;
		pthread_attr_init(&attr);
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		if (pthread_create(&t, &attr, stream_main, p) != 0) {
			grpc_call_cancel_with_status(p->call, GRPC_STATUS_RESOURCE_EXHAUSTED,
						     "server out of threads", NULL);
			end_call(p);
		}
		pthread_attr_destroy(&attr);
		return;
	}
	if (p->m->flags & KVM_RPC_INLINE) {
		/* A quick handler never asks whether its call was cancelled: the
		 * call's end is asked for in its final batch, so the queue brings
		 * one completion per call instead of two (a deferred call's two
		 * woke the server's threads twice: 2.2-2.3 context switches and
		 * 73 us of the coordinator's CPU per call on disk, 1.5 and 54 us
		 * with one). */
		atomic_store(&p->refs, 1);
		p->close_in_final = true;
		run_unary(p);
		return;
	}
	/* RECV_CLOSE_ON_SERVER completes when the call ends: at the client's
	 * cancel or deadline, the server's stop, or after the final status. */
	atomic_store(&p->refs, 2);
	grpc_op op = {.op = GRPC_OP_RECV_CLOSE_ON_SERVER};
	op.data.recv_close_on_server.cancelled = &p->c.close_cancelled;
	if (grpc_call_start_batch(p->call, &op, 1, &p->closed, NULL) != GRPC_CALL_OK) {
		atomic_store(&p->refs, 1);
		kvm_rpc_finish(&p->c, kvm_rpc_fail(&p->c, KVM_RPC_INTERNAL,
						   "could not start the call"));
		return;
	}
	if ((p->m->flags & KVM_RPC_INLINE) || srv->n_workers == 0) {
		run_unary(p);
		return;
	}
	pthread_mutex_lock(&srv->mu);
	p->next = NULL;
	if (srv->queue_tail)
		srv->queue_tail->next = p;
	else
		srv->queue_head = p;
	srv->queue_tail = p;
	pthread_cond_signal(&srv->work_cv);
	pthread_mutex_unlock(&srv->mu);
}

static void *cq_thread_main(void *arg)
{
	kvm_rpc_server *srv = arg;
	for (;;) {
		grpc_event ev =
			grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
		if (ev.type == GRPC_QUEUE_SHUTDOWN)
			break;
		if (ev.tag == &shutdown_tag) {
			pthread_mutex_lock(&srv->mu);
			srv->shutdown_done = true;
			pthread_cond_broadcast(&srv->cv);
			pthread_mutex_unlock(&srv->mu);
			continue;
		}
		call_tag *t = ev.tag;
		pending *p = t->p;
		switch (t->kind) {
		case TAG_CLOSED:
			atomic_store(&p->c.cancelled, p->c.close_cancelled != 0);
			unref_unary(p);
			break;
		case TAG_DONE:
			unref_unary(p);
			break;
		case TAG_ARRIVED:
			if (!ev.success) { /* the server is shutting down */
				free_pending(p);
				break;
			}
			request_call(srv, p->m);
			if (!p->m) { /* quick: answered on this thread */
				__atomic_fetch_add(&srv->unknown_calls, 1, __ATOMIC_RELAXED);
				refuse_unknown(p);
				free_pending(p);
				break;
			}
			call_arrived(srv, p);
			break;
		}
	}
	return NULL;
}

int kvm_rpc_server_create(const char *addr, int *port, kvm_rpc_server **out)
{
	if (!addr || !out)
		return -EINVAL;
	*out = NULL;
	kvm_rpc_server *srv = calloc(1, sizeof(*srv));
	if (!srv)
		return -ENOMEM;
	grpc_init();
	grpc_arg args[3];
	grpc_channel_args ca = {.num_args = 3, .args = args};
	message_limits(args);
	args[2] = (grpc_arg){.type = GRPC_ARG_INTEGER,
			     .key = GRPC_ARG_ALLOW_REUSEPORT,
			     .value.integer = 0}; /* a port in use must fail, not be shared */
	srv->server = grpc_server_create(&ca, NULL);
	srv->cq = grpc_completion_queue_create_for_next(NULL);
	grpc_server_register_completion_queue(srv->server, srv->cq, NULL);
	pthread_mutex_init(&srv->mu, NULL);
	pthread_cond_init(&srv->cv, NULL);
	pthread_cond_init(&srv->work_cv, NULL);

	grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
	int bound = grpc_server_add_http2_port(srv->server, addr, creds);
	grpc_server_credentials_release(creds);
	if (bound == 0) {
		kvm_rpc_server_destroy(srv, 0);
		return -EADDRINUSE;
	}
	if (port)
		*port = bound;
	*out = srv;
	return 0;
}

int kvm_rpc_server_add_method(kvm_rpc_server *srv, const char *name, unsigned flags,
			      kvm_rpc_handler fn, void *arg)
{
	if (!srv || !name || name[0] != '/' || !fn || srv->started ||
	    (flags & ~(unsigned)(KVM_RPC_STREAMING | KVM_RPC_INLINE)) ||
	    (flags & KVM_RPC_STREAMING && flags & KVM_RPC_INLINE))
		return -EINVAL;
	method *m = calloc(1, sizeof(*m));
	if (!m || !(m->name = strdup(name))) {
		free(m);
		return -ENOMEM;
	}
	m->handle = grpc_server_register_method(srv->server, m->name, NULL,
						GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
	if (!m->handle) {
		free(m->name);
		free(m);
		return -EEXIST;
	}
	m->flags = flags;
	m->fn = fn;
	m->arg = arg;
	m->next = srv->methods;
	srv->methods = m;
	return 0;
}

int kvm_rpc_server_set_token(kvm_rpc_server *srv, const char *token)
{
	if (!srv || srv->started)
		return -EINVAL;
	free(srv->auth);
	srv->auth = NULL;
	srv->auth_len = 0;
	if (!token || !*token)
		return 0;
	size_t n = strlen(token);
	if (n > KVM_AUTH_TOKEN_MAX)
		return -E2BIG;
	if (!(srv->auth = malloc(7 + n + 1)))
		return -ENOMEM;
	srv->auth_len = (size_t)snprintf(srv->auth, 7 + n + 1, "Bearer %s", token);
	return 0;
}

int kvm_rpc_server_start(kvm_rpc_server *srv)
{
	if (!srv || srv->started)
		return -EINVAL;
	grpc_server_start(srv->server);
	srv->started = true;
	for (method *m = srv->methods; m; m = m->next) {
		int rc = request_call(srv, m);
		if (rc != 0)
			return rc;
	}
	int rc = request_call(srv, NULL); /* everything else */
	if (rc != 0)
		return rc;
	for (; srv->n_workers < RPC_WORKERS; srv->n_workers++)
		if (pthread_create(&srv->workers[srv->n_workers], NULL, worker_main, srv) != 0)
			break; /* fewer workers; the queue's threads run the rest */
	long cores = sysconf(_SC_NPROCESSORS_ONLN);
	unsigned want = cores < 2 ? 2 : cores > RPC_MAX_CQ_THREADS ? RPC_MAX_CQ_THREADS
								 : (unsigned)cores;
	for (; srv->n_cq_threads < want; srv->n_cq_threads++)
		if (pthread_create(&srv->cq_threads[srv->n_cq_threads], NULL, cq_thread_main,
				   srv) != 0)
			break;
	return srv->n_cq_threads ? 0 : -EAGAIN;
}

void kvm_rpc_server_destroy(kvm_rpc_server *srv, int grace_ms)
{
	if (!srv)
		return;
	if (srv->started) {
		grpc_server_shutdown_and_notify(srv->server, srv->cq, &shutdown_tag);
		struct timespec until;
		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_sec += grace_ms / 1000;
		until.tv_nsec += (long)(grace_ms % 1000) * 1000000L;
		if (until.tv_nsec >= 1000000000L) {
			until.tv_sec++;
			until.tv_nsec -= 1000000000L;
		}
		pthread_mutex_lock(&srv->mu);
		while (!srv->shutdown_done &&
		       pthread_cond_timedwait(&srv->cv, &srv->mu, &until) != ETIMEDOUT)
			;
		pthread_mutex_unlock(&srv->mu);
		/* Whatever still runs after the grace period is cancelled; its
		 * handler sees kvm_rpc_cancelled() and returns (a deferred call
		 * must still be finished by its owner). */
		grpc_server_cancel_all_calls(srv->server);
		pthread_mutex_lock(&srv->mu);
		while (!srv->shutdown_done || srv->active_calls > 0)
			pthread_cond_wait(&srv->cv, &srv->mu);
		pthread_mutex_unlock(&srv->mu);
	}
	pthread_mutex_lock(&srv->mu);
	srv->stopping = true;
	pthread_cond_broadcast(&srv->work_cv);
	pthread_mutex_unlock(&srv->mu);
	for (unsigned i = 0; i < srv->n_workers; i++)
		pthread_join(srv->workers[i], NULL);
	grpc_server_destroy(srv->server);
	grpc_completion_queue_shutdown(srv->cq);
	if (srv->n_cq_threads)
		for (unsigned i = 0; i < srv->n_cq_threads; i++)
			pthread_join(srv->cq_threads[i], NULL);
	else
		while (grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
			       .type != GRPC_QUEUE_SHUTDOWN)
			;
	grpc_completion_queue_destroy(srv->cq);
	for (method *m = srv->methods, *n; m; m = n) {
		n = m->next;
		free(m->name);
		free(m);
	}
	pthread_cond_destroy(&srv->work_cv);
	pthread_cond_destroy(&srv->cv);
	pthread_mutex_destroy(&srv->mu);
	if (srv->auth)
		memset(srv->auth, 0, srv->auth_len);
	free(srv->auth);
	free(srv);
	grpc_shutdown();
}

static char close_tag, send_tag, final_tag;

/* ---- Metrics ------------------------------------------------------------------ */

/* The names grpc-go and the usual dashboards give the codes. */
static const char *const code_names[N_CODES] = {
	"OK",		  "Canceled",	       "Unknown",	   "InvalidArgument",
	"DeadlineExceeded", "NotFound",	       "AlreadyExists",	   "PermissionDenied",
	"ResourceExhausted", "FailedPrecondition", "Aborted",	   "OutOfRange",
	"Unimplemented",    "Internal",	       "Unavailable",	   "DataLoss",
	"Unauthenticated",
};

/* grpc_type, grpc_service and grpc_method labels of m. */
static void method_labels(const method *m, char *buf, size_t cap)
{
	const char *slash = strrchr(m->name, '/'); /* "/pkg.Service/Method" */
	int svc_len = (int)(slash - m->name) - 1;
	snprintf(buf, cap, "grpc_type=\"%s\",grpc_service=\"%.*s\",grpc_method=\"%s\"",
		 (m->flags & KVM_RPC_STREAMING) ? "server_stream" : "unary", svc_len, m->name + 1,
		 slash + 1);
}

void kvm_rpc_server_collect(void *arg, kvm_metrics_out *out)
{
	kvm_rpc_server *srv = arg;
	char labels[512], with_code[600];
	kvm_metrics_family(out, "grpc_server_started_total", "counter",
			   "RPCs started on the server.");
	for (method *m = srv->methods; m; m = m->next) {
		method_labels(m, labels, sizeof(labels));
		kvm_metrics_sample(out, "grpc_server_started_total", labels,
				   (double)__atomic_load_n(&m->started, __ATOMIC_RELAXED));
	}
	kvm_metrics_family(out, "grpc_server_handled_total", "counter",
			   "RPCs completed on the server, by status code (bad input: "
			   "InvalidArgument, NotFound, OutOfRange).");
	for (method *m = srv->methods; m; m = m->next) {
		method_labels(m, labels, sizeof(labels));
		for (int code = 0; code < N_CODES; code++) {
			uint64_t n = __atomic_load_n(&m->handled[code], __ATOMIC_RELAXED);
			if (n == 0 && code != KVM_RPC_OK) /* a code shows once it happened */
				continue;
			snprintf(with_code, sizeof(with_code), "%s,grpc_code=\"%s\"", labels,
				 code_names[code]);
			kvm_metrics_sample(out, "grpc_server_handled_total", with_code, (double)n);
		}
	}
	kvm_metrics_family(out, "grpc_server_handling_seconds", "histogram",
			   "Time from a unary RPC's arrival to its reply being sent.");
	for (method *m = srv->methods; m; m = m->next) {
		if (m->flags & KVM_RPC_STREAMING)
			continue;
		method_labels(m, labels, sizeof(labels));
		kvm_metrics_histogram(out, "grpc_server_handling_seconds", labels, &m->latency);
	}
	kvm_metrics_single(out, "kvmesh_rpc_unknown_method_total", "counter",
			   "Calls to methods this server does not have (answered Unimplemented).",
			   (double)__atomic_load_n(&srv->unknown_calls, __ATOMIC_RELAXED));
}

bool kvm_rpc_cancelled(kvm_rpc_call *c)
{
	if (!c->p->cq) /* unary: the server's queue reports the end */
		return atomic_load(&c->cancelled);
	if (!c->closed) {
		grpc_event ev = grpc_completion_queue_pluck(c->p->cq, &close_tag,
							    gpr_now(GPR_CLOCK_REALTIME), NULL);
		if (ev.type == GRPC_OP_COMPLETE) {
			c->closed = true;
			atomic_store(&c->cancelled, c->close_cancelled != 0);
		}
	}
	return atomic_load(&c->cancelled);
}

int kvm_rpc_reply(kvm_rpc_call *c, const void *msg, size_t len)
{
	if (!c || (!msg && len))
		return -EINVAL;
	if (c->replied)
		return -EALREADY;
	c->reply = malloc(len ? len : 1);
	if (!c->reply)
		return -ENOMEM;
	if (len)
		memcpy(c->reply, msg, len);
	c->reply_len = len;
	c->replied = true;
	return 0;
}

int kvm_rpc_send(kvm_rpc_call *c, const void *msg, size_t len)
{
	if (!c || (!msg && len) || !c->p->cq)
		return -EINVAL;
	if (kvm_rpc_cancelled(c))
		return -ECANCELED;
	grpc_op ops[2];
	size_t n = 0;
	memset(ops, 0, sizeof(ops));
	if (!c->initial_md_sent) {
		ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
		c->initial_md_sent = true;
	}
	grpc_byte_buffer *bb = bytes_to_buffer(msg, len);
	ops[n].op = GRPC_OP_SEND_MESSAGE;
	ops[n++].data.send_message.send_message = bb;
	int ok = run_batch(c->p->call, c->p->cq, ops, n, &send_tag);
	grpc_byte_buffer_destroy(bb);
	return ok ? 0 : -ECANCELED;
}

int kvm_rpc_fail(kvm_rpc_call *c, int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(c->message, sizeof(c->message), fmt, ap);
	va_end(ap);
	return code;
}

const char *kvm_rpc_metadata(kvm_rpc_call *c, const char *key, char *buf, size_t cap)
{
	if (!c || !key || !buf || cap == 0)
		return NULL;
	for (size_t i = 0; i < c->p->md.count; i++) {
		const grpc_metadata *m = &c->p->md.metadata[i];
		size_t kl = GRPC_SLICE_LENGTH(m->key);
		if (kl == strlen(key) && memcmp(GRPC_SLICE_START_PTR(m->key), key, kl) == 0) {
			size_t n = GRPC_SLICE_LENGTH(m->value);
			if (n >= cap)
				n = cap - 1;
			memcpy(buf, GRPC_SLICE_START_PTR(m->value), n);
			buf[n] = '\0';
			return buf;
		}
	}
	return NULL;
}

/* Fills the call's final batch (the response of a unary call that succeeded,
 * the status, and for an inline call the wait for its end) in ops[0..4);
 * returns how many. The buffers stay in the pending until it is freed. */
static size_t final_ops(pending *p, int code, grpc_op *ops)
{
	kvm_rpc_call *c = &p->c;
	size_t n = 0;
	method *m = p->m;
	__atomic_fetch_add(&m->handled[code >= 0 && code < N_CODES ? code : KVM_RPC_UNKNOWN], 1,
			   __ATOMIC_RELAXED);
	if (!(m->flags & KVM_RPC_STREAMING)) /* a stream's length says nothing */
		kvm_histogram_observe(&m->latency, now_ns() - p->arrived_ns);
	memset(ops, 0, 4 * sizeof(*ops));
	if (!c->initial_md_sent)
		ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
	if (code == KVM_RPC_OK && c->replied) {
		p->reply_bb = bytes_to_buffer(c->reply, c->reply_len);
		ops[n].op = GRPC_OP_SEND_MESSAGE;
		ops[n++].data.send_message.send_message = p->reply_bb;
	}
	p->details_slice = grpc_slice_from_copied_string(c->message);
	p->has_details = true;
	ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[n].data.send_status_from_server.status = (grpc_status_code)code;
	ops[n++].data.send_status_from_server.status_details = &p->details_slice;
	if (p->close_in_final) {
		ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
		ops[n++].data.recv_close_on_server.cancelled = &c->close_cancelled;
	}
	return n;
}

void kvm_rpc_finish(kvm_rpc_call *c, int code)
{
	pending *p = c->p;
	if (code == KVM_RPC_OK && !c->replied)
		code = kvm_rpc_fail(c, KVM_RPC_INTERNAL, "handler returned no response");
	grpc_op ops[4];
	size_t n = final_ops(p, code, ops);
	if (grpc_call_start_batch(p->call, ops, n, &p->done, NULL) != GRPC_CALL_OK)
		unref_unary(p); /* no completion will come */
}

/* Authorizes the call and reads its request: KVM_RPC_OK with *req (malloc'd,
 * NUL after it), or the status to end the call with. */
static int open_call(pending *p, void **req, size_t *req_len)
{
	*req = NULL;
	*req_len = 0;
	if (!call_authorized(p->srv, p, p->m->name, strlen(p->m->name))) /* before any read */
		return kvm_rpc_fail(&p->c, KVM_RPC_UNAUTHENTICATED, AUTH_DENIED);
	if (p->payload ? buffer_to_bytes(p->payload, req, req_len) != 0
		       : !(*req = calloc(1, 1)))
		return kvm_rpc_fail(&p->c, KVM_RPC_INTERNAL, "could not read the request");
	return KVM_RPC_OK;
}

static void run_unary(pending *p)
{
	void *req;
	size_t req_len;
	int code = open_call(p, &req, &req_len);
	if (code == KVM_RPC_OK)
		code = p->m->fn(p->m->arg, &p->c, req, req_len);
	free(req);
	if (code != KVM_RPC_DEFERRED)
		kvm_rpc_finish(&p->c, code);
}

/* A streaming call, on its own thread: blocking steps on its pluck queue. */
static void *stream_main(void *arg)
{
	pending *p = arg;
	kvm_rpc_call *c = &p->c;
	grpc_op op = {.op = GRPC_OP_RECV_CLOSE_ON_SERVER};
	op.data.recv_close_on_server.cancelled = &c->close_cancelled;
	void *req = NULL;
	size_t req_len;
	int code;
	if (grpc_call_start_batch(p->call, &op, 1, &close_tag, NULL) != GRPC_CALL_OK) {
		code = kvm_rpc_fail(c, KVM_RPC_INTERNAL, "could not start the call");
		c->closed = true; /* nothing to wait for */
	} else {
		code = open_call(p, &req, &req_len);
		if (code == KVM_RPC_OK)
			code = p->m->fn(p->m->arg, c, req, req_len);
		if (code == KVM_RPC_DEFERRED)
			code = kvm_rpc_fail(c, KVM_RPC_INTERNAL, "a stream cannot be deferred");
	}
	free(req);
	grpc_op ops[4];
	size_t n = final_ops(p, code, ops);
	run_batch(p->call, p->cq, ops, n, &final_tag);
	if (!c->closed)
		grpc_completion_queue_pluck(p->cq, &close_tag, gpr_inf_future(GPR_CLOCK_REALTIME),
					    NULL);
	end_call(p);
	return NULL;
}

/* ---- Client ------------------------------------------------------------------ */

/* A method this channel called before: gRPC has its path ready, which saves
 * building and parsing it on every call. */
typedef struct registered {
	struct registered *next;
	void *handle;
	char method[];
} registered;

struct kvm_rpc_channel {
	grpc_channel *ch;
	grpc_metadata auth; /* `authorization: Bearer <token>`, sent on every call */
	size_t n_md;        /* 1 with a token, else 0 */
	pthread_mutex_t mu;
	registered *methods;
};

/* The call's gRPC object, through the method's registration (made at its
 * first call). */
static grpc_call *create_call(kvm_rpc_channel *ch, grpc_completion_queue *cq, const char *method,
			      int timeout_ms)
{
	pthread_mutex_lock(&ch->mu);
	registered *r = ch->methods;
	while (r && strcmp(r->method, method) != 0)
		r = r->next;
	if (!r && (r = malloc(sizeof(*r) + strlen(method) + 1))) {
		strcpy(r->method, method);
		r->handle = grpc_channel_register_call(ch->ch, r->method, NULL, NULL);
		r->next = ch->methods;
		ch->methods = r;
	}
	pthread_mutex_unlock(&ch->mu);
	if (r)
		return grpc_channel_create_registered_call(ch->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
							   r->handle, deadline_in(timeout_ms), NULL);
	grpc_slice m = grpc_slice_from_copied_string(method);
	grpc_call *call = grpc_channel_create_call(ch->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, m,
						   NULL, deadline_in(timeout_ms), NULL);
	grpc_slice_unref(m);
	return call;
}

int kvm_rpc_channel_set_token(kvm_rpc_channel *c, const char *token)
{
	if (!c)
		return -EINVAL;
	if (token && strlen(token) > KVM_AUTH_TOKEN_MAX)
		return -E2BIG;
	if (c->n_md) {
		grpc_slice_unref(c->auth.key);
		grpc_slice_unref(c->auth.value);
		c->n_md = 0;
	}
	if (!token || !*token)
		return 0;
	char *v = malloc(7 + strlen(token) + 1);
	if (!v)
		return -ENOMEM;
	sprintf(v, "Bearer %s", token);
	memset(&c->auth, 0, sizeof(c->auth));
	c->auth.key = grpc_slice_from_static_string("authorization");
	c->auth.value = grpc_slice_from_copied_string(v);
	memset(v, 0, strlen(v));
	free(v);
	c->n_md = 1;
	return 0;
}

int kvm_rpc_channel_open(const char *target, kvm_rpc_channel **out)
{
	if (!target || !out)
		return -EINVAL;
	kvm_rpc_channel *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	pthread_mutex_init(&c->mu, NULL);
	grpc_init();
	grpc_arg args[2];
	grpc_channel_args ca = {.num_args = 2, .args = args};
	message_limits(args);
	grpc_channel_credentials *creds = grpc_insecure_credentials_create();
	c->ch = grpc_channel_create(target, creds, &ca);
	grpc_channel_credentials_release(creds);
	if (!c->ch) {
		free(c);
		grpc_shutdown();
		return -EINVAL;
	}
	*out = c;
	return 0;
}

void kvm_rpc_channel_close(kvm_rpc_channel *c)
{
	if (!c)
		return;
	kvm_rpc_channel_set_token(c, NULL);
	grpc_channel_destroy(c->ch);
	for (registered *r = c->methods, *n; r; r = n) {
		n = r->next;
		free(r);
	}
	pthread_mutex_destroy(&c->mu);
	free(c);
	grpc_shutdown();
}

static char client_tag;

/* One unary call in flight: what its single batch fills in. */
typedef struct unary_op {
	grpc_call *call;
	grpc_byte_buffer *out, *in;
	grpc_metadata_array md_initial, md_trailing;
	grpc_status_code code;
	grpc_slice details;
	void *tag;                      /* the caller's, for kvm_rpc_queue_next */
	struct unary_op *prev, *next; /* in the queue's list of calls in flight */
} unary_op;

/* Starts the call's one batch (send everything, receive everything) on cq,
 * with `tag`. Returns 0, or -EIO if it could not start (op is then clean). */
static int unary_begin(kvm_rpc_channel *ch, grpc_completion_queue *cq, const char *method,
		       const void *req, size_t len, int timeout_ms, unary_op *op, void *tag)
{
	op->call = create_call(ch, cq, method, timeout_ms);
	op->out = bytes_to_buffer(req ? req : "", len);
	op->in = NULL;
	grpc_metadata_array_init(&op->md_initial);
	grpc_metadata_array_init(&op->md_trailing);
	op->code = GRPC_STATUS_UNKNOWN;
	op->details = grpc_empty_slice();

	grpc_op ops[6];
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[0].data.send_initial_metadata.count = ch->n_md;
	ops[0].data.send_initial_metadata.metadata = ch->n_md ? &ch->auth : NULL;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = op->out;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &op->md_initial;
	ops[4].op = GRPC_OP_RECV_MESSAGE;
	ops[4].data.recv_message.recv_message = &op->in;
	ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[5].data.recv_status_on_client.trailing_metadata = &op->md_trailing;
	ops[5].data.recv_status_on_client.status = &op->code;
	ops[5].data.recv_status_on_client.status_details = &op->details;
	if (grpc_call_start_batch(op->call, ops, 6, tag, NULL) == GRPC_CALL_OK)
		return 0;
	grpc_call_unref(op->call);
	grpc_byte_buffer_destroy(op->out);
	grpc_metadata_array_destroy(&op->md_initial);
	grpc_metadata_array_destroy(&op->md_trailing);
	return -EIO;
}

/* The batch completed (ok: its success flag): fills the results as
 * kvm_rpc_unary documents them and frees what the call held. */
static int unary_end(unary_op *op, int ok, void **resp, size_t *resp_len, kvm_rpc_status *st)
{
	*resp = NULL;
	*resp_len = 0;
	int rc = ok ? 0 : -EIO;
	if (rc == 0) {
		copy_status(st, op->code, op->details);
		if (op->code == GRPC_STATUS_OK) {
			if (op->in)
				rc = buffer_to_bytes(op->in, resp, resp_len);
			else
				rc = -EPROTO; /* OK without a message: not a unary reply */
		}
	}
	if (op->in)
		grpc_byte_buffer_destroy(op->in);
	grpc_byte_buffer_destroy(op->out);
	grpc_slice_unref(op->details);
	grpc_metadata_array_destroy(&op->md_initial);
	grpc_metadata_array_destroy(&op->md_trailing);
	grpc_call_unref(op->call);
	return rc;
}

int kvm_rpc_unary(kvm_rpc_channel *ch, const char *method, const void *req, size_t len,
		  int timeout_ms, void **resp, size_t *resp_len, kvm_rpc_status *st)
{
	if (!ch || !method || (!req && len) || !resp || !resp_len || !st)
		return -EINVAL;
	*resp = NULL;
	*resp_len = 0;
	grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
	unary_op op;
	int rc = unary_begin(ch, cq, method, req, len, timeout_ms, &op, &client_tag);
	if (rc == 0) {
		grpc_event ev = grpc_completion_queue_pluck(cq, &client_tag,
							    gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
		rc = unary_end(&op, ev.type == GRPC_OP_COMPLETE && ev.success, resp, resp_len, st);
	}
	destroy_pluck_cq(cq);
	return rc;
}

struct kvm_rpc_queue {
	grpc_completion_queue *cq;
	pthread_mutex_t mu;
	unary_op *running; /* calls started and not yet returned by next */
};

/* Takes an ended (or never started) call off the queue's list. */
static void unlist(kvm_rpc_queue *q, unary_op *op)
{
	pthread_mutex_lock(&q->mu);
	if (op->prev)
		op->prev->next = op->next;
	else
		q->running = op->next;
	if (op->next)
		op->next->prev = op->prev;
	pthread_mutex_unlock(&q->mu);
}

int kvm_rpc_queue_create(kvm_rpc_queue **out)
{
	if (!out)
		return -EINVAL;
	kvm_rpc_queue *q = calloc(1, sizeof(*q));
	if (!q)
		return -ENOMEM;
	grpc_init();
	q->cq = grpc_completion_queue_create_for_next(NULL);
	pthread_mutex_init(&q->mu, NULL);
	*out = q;
	return 0;
}

int kvm_rpc_unary_start(kvm_rpc_channel *ch, kvm_rpc_queue *q, const char *method,
			const void *req, size_t len, int timeout_ms, void *tag)
{
	if (!ch || !q || !method || (!req && len))
		return -EINVAL;
	unary_op *op = calloc(1, sizeof(*op));
	if (!op)
		return -ENOMEM;
	op->tag = tag;
	/* Listed before it starts: its completion may come at once. */
	pthread_mutex_lock(&q->mu);
	op->next = q->running;
	if (q->running)
		q->running->prev = op;
	q->running = op;
	pthread_mutex_unlock(&q->mu);
	int rc = unary_begin(ch, q->cq, method, req, len, timeout_ms, op, op);
	if (rc != 0) {
		unlist(q, op);
		free(op);
	}
	return rc;
}

int kvm_rpc_queue_next(kvm_rpc_queue *q, int timeout_ms, void **tag, void **resp,
		       size_t *resp_len, kvm_rpc_status *st)
{
	if (!q || !tag || !resp || !resp_len || !st)
		return -EINVAL;
	*tag = NULL;
	*resp = NULL;
	*resp_len = 0;
	gpr_timespec until = timeout_ms < 0 ? gpr_inf_future(GPR_CLOCK_REALTIME)
		: gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
			       gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
	grpc_event ev = grpc_completion_queue_next(q->cq, until, NULL);
	if (ev.type != GRPC_OP_COMPLETE)
		return 0; /* timeout */
	unary_op *op = ev.tag;
	unlist(q, op);
	*tag = op->tag;
	int rc = unary_end(op, ev.success, resp, resp_len, st);
	free(op);
	return rc == 0 ? 1 : rc;
}

void kvm_rpc_queue_destroy(kvm_rpc_queue *q)
{
	if (!q)
		return;
	pthread_mutex_lock(&q->mu);
	for (unary_op *op = q->running; op; op = op->next)
		grpc_call_cancel(op->call, NULL);
	pthread_mutex_unlock(&q->mu);
	for (;;) { /* the cancelled calls complete; their results are dropped */
		pthread_mutex_lock(&q->mu);
		bool left = q->running != NULL;
		pthread_mutex_unlock(&q->mu);
		if (!left)
			break;
		void *tag, *resp;
		size_t len;
		kvm_rpc_status st;
		if (kvm_rpc_queue_next(q, -1, &tag, &resp, &len, &st) == 1)
			free(resp);
	}
	grpc_completion_queue_shutdown(q->cq);
	while (grpc_completion_queue_next(q->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
	       GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(q->cq);
	pthread_mutex_destroy(&q->mu);
	free(q);
	grpc_shutdown();
}

struct kvm_rpc_stream {
	grpc_completion_queue *cq;
	grpc_call *call;
	grpc_metadata_array md_initial;
	bool ended;
	kvm_rpc_status status;
};

int kvm_rpc_stream_open(kvm_rpc_channel *ch, const char *method, const void *req, size_t len,
			int timeout_ms, kvm_rpc_stream **outp)
{
	if (!ch || !method || (!req && len) || !outp)
		return -EINVAL;
	kvm_rpc_stream *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->cq = grpc_completion_queue_create_for_pluck(NULL);
	s->call = create_call(ch, s->cq, method, timeout_ms);
	grpc_metadata_array_init(&s->md_initial);
	grpc_byte_buffer *out = bytes_to_buffer(req ? req : "", len);
	grpc_op ops[4];
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[0].data.send_initial_metadata.count = ch->n_md;
	ops[0].data.send_initial_metadata.metadata = ch->n_md ? &ch->auth : NULL;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = out;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA; /* with the first receive, or none arrive */
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &s->md_initial;
	int ok = run_batch(s->call, s->cq, ops, 4, &client_tag);
	grpc_byte_buffer_destroy(out);
	/* A failed start is reported by the status at the first next(). */
	(void)ok;
	*outp = s;
	return 0;
}

static void stream_finish(kvm_rpc_stream *s)
{
	grpc_metadata_array trailing;
	grpc_metadata_array_init(&trailing);
	grpc_status_code code = GRPC_STATUS_UNKNOWN;
	grpc_slice details = grpc_empty_slice();
	grpc_op op;
	memset(&op, 0, sizeof(op));
	op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	op.data.recv_status_on_client.trailing_metadata = &trailing;
	op.data.recv_status_on_client.status = &code;
	op.data.recv_status_on_client.status_details = &details;
	run_batch(s->call, s->cq, &op, 1, &client_tag);
	copy_status(&s->status, code, details);
	grpc_slice_unref(details);
	grpc_metadata_array_destroy(&trailing);
	s->ended = true;
}

int kvm_rpc_stream_next(kvm_rpc_stream *s, void **msg, size_t *len)
{
	if (!s || !msg || !len)
		return -EINVAL;
	*msg = NULL;
	*len = 0;
	if (s->ended)
		return 0;
	grpc_byte_buffer *in = NULL;
	grpc_op op;
	memset(&op, 0, sizeof(op));
	op.op = GRPC_OP_RECV_MESSAGE;
	op.data.recv_message.recv_message = &in;
	run_batch(s->call, s->cq, &op, 1, &client_tag);
	if (!in) {
		stream_finish(s);
		return 0;
	}
	int rc = buffer_to_bytes(in, msg, len);
	grpc_byte_buffer_destroy(in);
	return rc == 0 ? 1 : rc;
}

const kvm_rpc_status *kvm_rpc_stream_status(const kvm_rpc_stream *s)
{
	return s && s->ended ? &s->status : NULL;
}

void kvm_rpc_stream_close(kvm_rpc_stream *s)
{
	if (!s)
		return;
	if (!s->ended) {
		grpc_call_cancel(s->call, NULL);
		stream_finish(s);
	}
	grpc_metadata_array_destroy(&s->md_initial);
	grpc_call_unref(s->call);
	destroy_pluck_cq(s->cq);
	free(s);
}
