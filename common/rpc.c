/* gRPC C core wrapper. See rpc.h for the contract.
 *
 * Server: one acceptor thread polls the server's completion queue for new
 * calls; each call has its own pluck completion queue and runs on one thread
 * (a pool worker for unary calls, a thread of its own for streaming ones), so
 * a handler's sends and the final status are plain blocking steps (the
 * pattern of gRPC's Ruby extension). One request per registered method is
 * always outstanding: a new one is posted as each call arrives. */
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/auth.h"
#include "common/log.h"

/* ---- Helpers ----------------------------------------------------------------- */

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

typedef struct method {
	char *name;
	void *handle;
	bool streaming;
	kvm_rpc_handler fn;
	void *arg;
	struct method *next;
} method;

/* One outstanding request for a method; becomes a call when it arrives. */
typedef struct pending {
	struct pending *next; /* in the server's work queue */
	method *m; /* NULL: a call to a method nobody registered */
	grpc_call_details details;
	kvm_rpc_server *srv;
	grpc_call *call;
	gpr_timespec deadline;
	grpc_metadata_array md;
	grpc_byte_buffer *payload;
	grpc_completion_queue *cq;
} pending;

struct kvm_rpc_server {
	grpc_server *server;
	grpc_completion_queue *cq;
	method *methods;
	pthread_t acceptor;
	bool started, acceptor_running;

	pthread_mutex_t mu;
	pthread_cond_t cv;
	unsigned active_calls;
	bool shutdown_done;

	/* Unary calls run on a fixed pool of workers (a thread per call costs
	 * more than a short handler); streaming calls, which may last, get a
	 * thread each. */
	pthread_t workers[RPC_WORKERS];
	unsigned n_workers;
	pthread_cond_t work_cv;
	struct pending *queue_head, *queue_tail;
	bool stopping;

	/* "Bearer <token>" that calls must present (auth_len 0: none). */
	char *auth;
	size_t auth_len;
};

struct kvm_rpc_call {
	pending *p;
	bool initial_md_sent, replied, closed, cancelled;
	int close_cancelled; /* filled by RECV_CLOSE_ON_SERVER */
	void *reply;
	size_t reply_len;
	char message[512];
};

static char shutdown_tag;

static void *call_main(void *arg);
static void run_call(struct pending *p);

static void *worker_main(void *arg)
{
	kvm_rpc_server *srv = arg;
	pthread_mutex_lock(&srv->mu);
	for (;;) {
		while (!srv->queue_head && !srv->stopping)
			pthread_cond_wait(&srv->work_cv, &srv->mu);
		if (!srv->queue_head)
			break; /* stopping, and nothing left */
		struct pending *p = srv->queue_head;
		srv->queue_head = p->next;
		if (!srv->queue_head)
			srv->queue_tail = NULL;
		pthread_mutex_unlock(&srv->mu);
		run_call(p);
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
	grpc_metadata_array_init(&p->md);
	grpc_call_details_init(&p->details);
	p->cq = grpc_completion_queue_create_for_pluck(NULL);
	grpc_call_error err =
		m ? grpc_server_request_registered_call(srv->server, m->handle, &p->call,
							&p->deadline, &p->md, &p->payload, p->cq,
							srv->cq, p)
		  : grpc_server_request_call(srv->server, &p->call, &p->details, &p->md, p->cq,
					     srv->cq, p);
	if (err != GRPC_CALL_OK) {
		grpc_call_details_destroy(&p->details);
		grpc_metadata_array_destroy(&p->md);
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
	grpc_call_details_destroy(&p->details);
	grpc_metadata_array_destroy(&p->md);
	destroy_pluck_cq(p->cq);
	free(p);
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

static void *acceptor_main(void *arg)
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
		pending *p = ev.tag;
		if (!ev.success) { /* the server is shutting down */
			free_pending(p);
			continue;
		}
		request_call(srv, p->m);
		if (!p->m) { /* quick: answered on this thread */
			refuse_unknown(p);
			free_pending(p);
			continue;
		}
		pthread_mutex_lock(&srv->mu);
		srv->active_calls++;
		if (!p->m->streaming && srv->n_workers > 0) {
			p->next = NULL;
			if (srv->queue_tail)
				srv->queue_tail->next = p;
			else
				srv->queue_head = p;
			srv->queue_tail = p;
			pthread_cond_signal(&srv->work_cv);
			pthread_mutex_unlock(&srv->mu);
			continue;
		}
		pthread_mutex_unlock(&srv->mu);
		pthread_t t;
		pthread_attr_t attr;
		pthread_attr_init(&attr);
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		if (pthread_create(&t, &attr, call_main, p) != 0) {
			grpc_call_cancel_with_status(p->call, GRPC_STATUS_RESOURCE_EXHAUSTED,
						     "server out of threads", NULL);
			free_pending(p);
			pthread_mutex_lock(&srv->mu);
			srv->active_calls--;
			pthread_cond_broadcast(&srv->cv);
			pthread_mutex_unlock(&srv->mu);
		}
		pthread_attr_destroy(&attr);
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

int kvm_rpc_server_add_method(kvm_rpc_server *srv, const char *name, bool streaming,
			      kvm_rpc_handler fn, void *arg)
{
	if (!srv || !name || name[0] != '/' || !fn || srv->started)
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
	m->streaming = streaming;
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
			break; /* fewer workers; streaming-style threads cover the rest */
	if (pthread_create(&srv->acceptor, NULL, acceptor_main, srv) != 0)
		return -EAGAIN;
	srv->acceptor_running = true;
	return 0;
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
		 * handler sees kvm_rpc_cancelled() and returns. */
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
	if (srv->acceptor_running)
		pthread_join(srv->acceptor, NULL);
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

/* Starts watching for the call's end (client cancel, deadline, server stop):
 * RECV_CLOSE_ON_SERVER completes only then, and kvm_rpc_cancelled polls it. */
static int start_close_watch(kvm_rpc_call *c)
{
	grpc_op op = {.op = GRPC_OP_RECV_CLOSE_ON_SERVER};
	op.data.recv_close_on_server.cancelled = &c->close_cancelled;
	return grpc_call_start_batch(c->p->call, &op, 1, &close_tag, NULL) == GRPC_CALL_OK ? 0
											   : -EIO;
}

bool kvm_rpc_cancelled(kvm_rpc_call *c)
{
	if (!c->closed) {
		grpc_event ev = grpc_completion_queue_pluck(c->p->cq, &close_tag,
							    gpr_now(GPR_CLOCK_REALTIME), NULL);
		if (ev.type == GRPC_OP_COMPLETE) {
			c->closed = true;
			c->cancelled = c->close_cancelled != 0;
		}
	}
	return c->cancelled;
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
	if (!c || (!msg && len))
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

static void *call_main(void *arg)
{
	run_call(arg);
	return NULL;
}

static void run_call(pending *p)
{
	kvm_rpc_server *srv = p->srv;
	kvm_rpc_call c = {.p = p};
	int code = KVM_RPC_INTERNAL;
	void *req = NULL;
	size_t req_len = 0;

	if (start_close_watch(&c) != 0) {
		snprintf(c.message, sizeof(c.message), "could not start the call");
	} else if (!call_authorized(srv, p, p->m->name, strlen(p->m->name))) {
		/* Before the handler and before the request is even read. */
		code = KVM_RPC_UNAUTHENTICATED;
		snprintf(c.message, sizeof(c.message), AUTH_DENIED);
	} else if (p->payload && buffer_to_bytes(p->payload, &req, &req_len) != 0) {
		snprintf(c.message, sizeof(c.message), "could not read the request");
	} else {
		if (!p->payload)
			req = calloc(1, 1);
		code = p->m->fn(p->m->arg, &c, req, req_len);
		if (code == KVM_RPC_OK && !p->m->streaming && !c.replied) {
			code = KVM_RPC_INTERNAL;
			snprintf(c.message, sizeof(c.message), "handler returned no response");
		}
	}
	free(req);

	/* The final batch: the response (unary, on success) and the status. */
	grpc_op ops[3];
	size_t n = 0;
	memset(ops, 0, sizeof(ops));
	if (!c.initial_md_sent)
		ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
	grpc_byte_buffer *bb = NULL;
	if (code == KVM_RPC_OK && c.replied) {
		bb = bytes_to_buffer(c.reply, c.reply_len);
		ops[n].op = GRPC_OP_SEND_MESSAGE;
		ops[n++].data.send_message.send_message = bb;
	}
	grpc_slice details = grpc_slice_from_copied_string(c.message);
	ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[n].data.send_status_from_server.status = (grpc_status_code)code;
	ops[n++].data.send_status_from_server.status_details = &details;
	run_batch(p->call, p->cq, ops, n, &final_tag);
	grpc_slice_unref(details);
	if (bb)
		grpc_byte_buffer_destroy(bb);
	free(c.reply);
	if (!c.closed)
		grpc_completion_queue_pluck(p->cq, &close_tag, gpr_inf_future(GPR_CLOCK_REALTIME),
					    NULL);
	free_pending(p);

	pthread_mutex_lock(&srv->mu);
	srv->active_calls--;
	pthread_cond_broadcast(&srv->cv);
	pthread_mutex_unlock(&srv->mu);
}

/* ---- Client ------------------------------------------------------------------ */

struct kvm_rpc_channel {
	grpc_channel *ch;
	grpc_metadata auth; /* `authorization: Bearer <token>`, sent on every call */
	size_t n_md;        /* 1 with a token, else 0 */
};

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
	free(c);
	grpc_shutdown();
}

static char client_tag;

int kvm_rpc_unary(kvm_rpc_channel *ch, const char *method, const void *req, size_t len,
		  int timeout_ms, void **resp, size_t *resp_len, kvm_rpc_status *st)
{
	if (!ch || !method || (!req && len) || !resp || !resp_len || !st)
		return -EINVAL;
	*resp = NULL;
	*resp_len = 0;
	grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
	grpc_slice m = grpc_slice_from_copied_string(method);
	grpc_call *call = grpc_channel_create_call(ch->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, m,
						   NULL, deadline_in(timeout_ms), NULL);
	grpc_slice_unref(m);
	grpc_byte_buffer *out = bytes_to_buffer(req ? req : "", len), *in = NULL;
	grpc_metadata_array md_initial, md_trailing;
	grpc_metadata_array_init(&md_initial);
	grpc_metadata_array_init(&md_trailing);
	grpc_status_code code = GRPC_STATUS_UNKNOWN;
	grpc_slice details = grpc_empty_slice();

	grpc_op ops[6];
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[0].data.send_initial_metadata.count = ch->n_md;
	ops[0].data.send_initial_metadata.metadata = ch->n_md ? &ch->auth : NULL;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = out;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_initial;
	ops[4].op = GRPC_OP_RECV_MESSAGE;
	ops[4].data.recv_message.recv_message = &in;
	ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[5].data.recv_status_on_client.trailing_metadata = &md_trailing;
	ops[5].data.recv_status_on_client.status = &code;
	ops[5].data.recv_status_on_client.status_details = &details;
	int rc = run_batch(call, cq, ops, 6, &client_tag) ? 0 : -EIO;
	if (rc == 0) {
		copy_status(st, code, details);
		if (code == GRPC_STATUS_OK) {
			if (in)
				rc = buffer_to_bytes(in, resp, resp_len);
			else
				rc = -EPROTO; /* OK without a message: not a unary reply */
		}
	}
	if (in)
		grpc_byte_buffer_destroy(in);
	grpc_byte_buffer_destroy(out);
	grpc_slice_unref(details);
	grpc_metadata_array_destroy(&md_initial);
	grpc_metadata_array_destroy(&md_trailing);
	grpc_call_unref(call);
	destroy_pluck_cq(cq);
	return rc;
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
	grpc_slice m = grpc_slice_from_copied_string(method);
	s->call = grpc_channel_create_call(ch->ch, NULL, GRPC_PROPAGATE_DEFAULTS, s->cq, m, NULL,
					   deadline_in(timeout_ms), NULL);
	grpc_slice_unref(m);
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
