/* The gRPC wrapper over real loopback connections: unary and streaming
 * calls, status codes and messages, deadlines, cancellation, shutdown with
 * calls in flight, and a port already in use. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/rpc.h"

static atomic_int stream_saw_cancel;

static int echo(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	(void)arg;
	char auth[64];
	if (kvm_rpc_metadata(call, "authorization", auth, sizeof(auth)))
		return kvm_rpc_fail(call, KVM_RPC_UNAUTHENTICATED, "unexpected token");
	kvm_rpc_reply(call, req, len);
	return KVM_RPC_OK;
}

static int not_found(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	(void)arg;
	return kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "no sequence %.*s", (int)len, (const char *)req);
}

static int slow(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	(void)arg;
	for (int i = 0; i < 300 && !kvm_rpc_cancelled(call); i++)
		usleep(10 * 1000);
	kvm_rpc_reply(call, req, len);
	return KVM_RPC_OK;
}

/* Deferred calls: the handler hands its call to a finisher thread, which
 * answers after `later_ms` (the request echoed, or NOT_FOUND for "missing"). */
static atomic_int later_ms = 20;

typedef struct later_job {
	kvm_rpc_call *call;
	char *req;
	size_t len;
} later_job;

static void *later_finish(void *arg)
{
	later_job *j = arg;
	usleep((useconds_t)atomic_load(&later_ms) * 1000);
	if (j->len == 7 && memcmp(j->req, "missing", 7) == 0) {
		kvm_rpc_finish(j->call, kvm_rpc_fail(j->call, KVM_RPC_NOT_FOUND, "not here"));
	} else {
		kvm_rpc_reply(j->call, j->req, j->len);
		kvm_rpc_finish(j->call, KVM_RPC_OK);
	}
	free(j->req);
	free(j);
	return NULL;
}

static int later(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	(void)arg;
	later_job *j = malloc(sizeof(*j));
	j->call = call;
	j->req = malloc(len + 1);
	memcpy(j->req, req, len);
	j->len = len;
	pthread_t t;
	cr_assert_eq(pthread_create(&t, NULL, later_finish, j), 0);
	pthread_detach(t);
	return KVM_RPC_DEFERRED;
}

/* Streams `n` numbered messages (n from the request), or forever if n == 0
 * until the client cancels. */
static int count(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	(void)arg;
	int n = 0;
	if (len > 0)
		n = atoi((const char *)req);
	for (int i = 0; n == 0 || i < n; i++) {
		char msg[32];
		int m = snprintf(msg, sizeof(msg), "%d", i);
		if (kvm_rpc_send(call, msg, (size_t)m) != 0) {
			atomic_store(&stream_saw_cancel, 1);
			return KVM_RPC_CANCELLED;
		}
		if (n == 0)
			usleep(5 * 1000);
	}
	return KVM_RPC_OK;
}

static kvm_rpc_server *start_server(int *port)
{
	kvm_rpc_server *srv;
	cr_assert_eq(kvm_rpc_server_create("127.0.0.1:0", port, &srv), 0);
	cr_assert(*port > 0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Echo", KVM_RPC_INLINE, echo, NULL), 0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/NotFound", KVM_RPC_UNARY, not_found, NULL),
		     0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Slow", KVM_RPC_UNARY, slow, NULL), 0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Later", KVM_RPC_INLINE, later, NULL), 0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Count", KVM_RPC_STREAMING, count, NULL),
		     0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Echo", KVM_RPC_UNARY, echo, NULL),
		     -EEXIST);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Both",
					       KVM_RPC_STREAMING | KVM_RPC_INLINE, count, NULL),
		     -EINVAL);
	cr_assert_eq(kvm_rpc_server_start(srv), 0);
	return srv;
}

static kvm_rpc_channel *connect_to(int port)
{
	char target[64];
	snprintf(target, sizeof(target), "127.0.0.1:%d", port);
	kvm_rpc_channel *ch;
	cr_assert_eq(kvm_rpc_channel_open(target, &ch), 0);
	return ch;
}

Test(rpc, unary_echo_and_error_status)
{
	int port;
	kvm_rpc_server *srv = start_server(&port);
	kvm_rpc_channel *ch = connect_to(port);
	void *resp;
	size_t len;
	kvm_rpc_status st;

	/* Many calls, of sizes up to 4 MiB. */
	for (size_t n = 1; n <= 4u << 20; n *= 8) {
		uint8_t *buf = malloc(n);
		for (size_t i = 0; i < n; i++)
			buf[i] = (uint8_t)(i * 31 + n);
		cr_assert_eq(kvm_rpc_unary(ch, "/t.T/Echo", buf, n, 5000, &resp, &len, &st), 0);
		cr_assert_eq(st.code, KVM_RPC_OK, "status %d %s", st.code, st.message);
		cr_assert_eq(len, n);
		cr_assert(memcmp(resp, buf, n) == 0);
		free(resp);
		free(buf);
	}
	/* An empty message is a valid message. */
	cr_assert_eq(kvm_rpc_unary(ch, "/t.T/Echo", NULL, 0, 5000, &resp, &len, &st), 0);
	cr_assert_eq(st.code, KVM_RPC_OK);
	cr_assert_eq(len, 0);
	free(resp);

	cr_assert_eq(kvm_rpc_unary(ch, "/t.T/NotFound", "s42", 3, 5000, &resp, &len, &st), 0);
	cr_assert_eq(st.code, KVM_RPC_NOT_FOUND);
	cr_assert_str_eq(st.message, "no sequence s42");
	cr_assert_null(resp);

	cr_assert_eq(kvm_rpc_unary(ch, "/t.T/Nope", "x", 1, 5000, &resp, &len, &st), 0);
	cr_assert_eq(st.code, KVM_RPC_UNIMPLEMENTED);

	kvm_rpc_channel_close(ch);
	kvm_rpc_server_destroy(srv, 1000);
}

Test(rpc, deadline_is_honoured_and_handler_sees_it)
{
	int port;
	kvm_rpc_server *srv = start_server(&port);
	kvm_rpc_channel *ch = connect_to(port);
	void *resp;
	size_t len;
	kvm_rpc_status st;
	cr_assert_eq(kvm_rpc_unary(ch, "/t.T/Slow", "x", 1, 100, &resp, &len, &st), 0);
	cr_assert_eq(st.code, KVM_RPC_DEADLINE_EXCEEDED, "got %d %s", st.code, st.message);
	kvm_rpc_channel_close(ch);
	kvm_rpc_server_destroy(srv, 1000);
}

Test(rpc, server_stream_delivers_all_then_status)
{
	int port;
	kvm_rpc_server *srv = start_server(&port);
	kvm_rpc_channel *ch = connect_to(port);
	kvm_rpc_stream *s;
	cr_assert_eq(kvm_rpc_stream_open(ch, "/t.T/Count", "100", 3, 5000, &s), 0);
	void *msg;
	size_t len;
	int got = 0, rc;
	while ((rc = kvm_rpc_stream_next(s, &msg, &len)) == 1) {
		char want[32];
		snprintf(want, sizeof(want), "%d", got++);
		cr_assert_eq(len, strlen(want));
		cr_assert(memcmp(msg, want, len) == 0);
		free(msg);
	}
	cr_assert_eq(rc, 0);
	cr_assert_eq(got, 100);
	cr_assert_eq(kvm_rpc_stream_status(s)->code, KVM_RPC_OK);
	kvm_rpc_stream_close(s);
	kvm_rpc_channel_close(ch);
	kvm_rpc_server_destroy(srv, 1000);
}

Test(rpc, client_cancel_reaches_streaming_handler)
{
	int port;
	kvm_rpc_server *srv = start_server(&port);
	kvm_rpc_channel *ch = connect_to(port);
	kvm_rpc_stream *s;
	cr_assert_eq(kvm_rpc_stream_open(ch, "/t.T/Count", "0", 1, 0, &s), 0);
	void *msg;
	size_t len;
	for (int i = 0; i < 5; i++) {
		cr_assert_eq(kvm_rpc_stream_next(s, &msg, &len), 1);
		free(msg);
	}
	kvm_rpc_stream_close(s); /* cancels */
	for (int i = 0; i < 300 && !atomic_load(&stream_saw_cancel); i++)
		usleep(10 * 1000);
	cr_assert(atomic_load(&stream_saw_cancel), "handler never saw the cancel");
	kvm_rpc_channel_close(ch);
	kvm_rpc_server_destroy(srv, 1000);
}

Test(rpc, shutdown_with_an_endless_stream_in_flight)
{
	int port;
	kvm_rpc_server *srv = start_server(&port);
	kvm_rpc_channel *ch = connect_to(port);
	kvm_rpc_stream *s;
	cr_assert_eq(kvm_rpc_stream_open(ch, "/t.T/Count", "0", 1, 0, &s), 0);
	void *msg;
	size_t len;
	cr_assert_eq(kvm_rpc_stream_next(s, &msg, &len), 1);
	free(msg);
	/* Returns once the handler noticed and returned. */
	kvm_rpc_server_destroy(srv, 100);
	int rc;
	while ((rc = kvm_rpc_stream_next(s, &msg, &len)) == 1)
		free(msg);
	cr_assert_eq(rc, 0);
	cr_assert_neq(kvm_rpc_stream_status(s)->code, KVM_RPC_OK);
	kvm_rpc_stream_close(s);
	kvm_rpc_channel_close(ch);
}

Test(rpc, port_in_use_is_refused)
{
	int port;
	kvm_rpc_server *srv = start_server(&port);
	char addr[64];
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
	kvm_rpc_server *second;
	cr_assert_eq(kvm_rpc_server_create(addr, NULL, &second), -EADDRINUSE);
	kvm_rpc_server_destroy(srv, 1000);
}

Test(rpc, server_down_gives_unavailable)
{
	int port;
	kvm_rpc_server *srv = start_server(&port);
	kvm_rpc_server_destroy(srv, 0);
	kvm_rpc_channel *ch = connect_to(port);
	void *resp;
	size_t len;
	kvm_rpc_status st;
	cr_assert_eq(kvm_rpc_unary(ch, "/t.T/Echo", "x", 1, 2000, &resp, &len, &st), 0);
	cr_assert(st.code == KVM_RPC_UNAVAILABLE || st.code == KVM_RPC_DEADLINE_EXCEEDED,
		  "got %d", st.code);
	kvm_rpc_channel_close(ch);
}

/* ---- Deferred calls, inline handlers and the async client queue ---------------- */

typedef struct caller_arg {
	int port, id;
} caller_arg;

static void *call_later_many(void *arg)
{
	caller_arg *a = arg;
	kvm_rpc_channel *ch = connect_to(a->port);
	for (int i = 0; i < 8; i++) {
		char msg[32];
		int n = snprintf(msg, sizeof(msg), "t%d-%d", a->id, i);
		void *resp;
		size_t len;
		kvm_rpc_status st;
		cr_assert_eq(kvm_rpc_unary(ch, "/t.T/Later", msg, (size_t)n, 5000, &resp, &len, &st),
			     0);
		cr_assert_eq(st.code, KVM_RPC_OK, "%d %s", st.code, st.message);
		cr_assert_eq(len, (size_t)n);
		cr_assert(memcmp(resp, msg, len) == 0);
		free(resp);
	}
	kvm_rpc_channel_close(ch);
	return NULL;
}

Test(rpc, deferred_calls_are_finished_from_another_thread)
{
	int port;
	kvm_rpc_server *srv = start_server(&port);
	/* 8 clients at once: more deferred calls waiting than server threads. */
	pthread_t t[8];
	caller_arg a[8];
	for (int i = 0; i < 8; i++) {
		a[i] = (caller_arg){port, i};
		pthread_create(&t[i], NULL, call_later_many, &a[i]);
	}
	for (int i = 0; i < 8; i++)
		pthread_join(t[i], NULL);
	/* A deferred call that fails keeps its status and message. */
	kvm_rpc_channel *ch = connect_to(port);
	void *resp;
	size_t len;
	kvm_rpc_status st;
	cr_assert_eq(kvm_rpc_unary(ch, "/t.T/Later", "missing", 7, 5000, &resp, &len, &st), 0);
	cr_assert_eq(st.code, KVM_RPC_NOT_FOUND);
	cr_assert_str_eq(st.message, "not here");
	cr_assert_null(resp);
	kvm_rpc_channel_close(ch);
	kvm_rpc_server_destroy(srv, 1000);
}

Test(rpc, inline_and_deferred_calls_go_on_while_every_worker_is_busy)
{
	int port;
	kvm_rpc_server *srv = start_server(&port);
	kvm_rpc_channel *ch = connect_to(port);
	kvm_rpc_queue *q;
	cr_assert_eq(kvm_rpc_queue_create(&q), 0);
	/* More Slow calls than pool workers: each holds one for 3 s unless
	 * its 2 s deadline passes first. */
	enum { SLOW = 20 };
	for (intptr_t i = 0; i < SLOW; i++)
		cr_assert_eq(kvm_rpc_unary_start(ch, q, "/t.T/Slow", "s", 1, 2000, (void *)(i + 1)), 0);
	usleep(200 * 1000);
	void *resp;
	size_t len;
	kvm_rpc_status st;
	cr_assert_eq(kvm_rpc_unary(ch, "/t.T/Echo", "quick", 5, 1000, &resp, &len, &st), 0);
	cr_assert_eq(st.code, KVM_RPC_OK, "an inline call waits for no worker: %d %s", st.code,
		     st.message);
	free(resp);
	cr_assert_eq(kvm_rpc_unary(ch, "/t.T/Later", "later", 5, 1000, &resp, &len, &st), 0);
	cr_assert_eq(st.code, KVM_RPC_OK, "%d %s", st.code, st.message);
	free(resp);
	int ended = 0;
	bool seen[SLOW + 1] = {false};
	while (ended < SLOW) {
		void *tag;
		int rc = kvm_rpc_queue_next(q, 10000, &tag, &resp, &len, &st);
		cr_assert_eq(rc, 1, "every Slow call ends (rc %d)", rc);
		intptr_t i = (intptr_t)tag;
		cr_assert(i >= 1 && i <= SLOW && !seen[i], "each tag comes back once");
		seen[i] = true;
		cr_assert_eq(st.code, KVM_RPC_DEADLINE_EXCEEDED, "%d %s", st.code, st.message);
		ended++;
	}
	kvm_rpc_queue_destroy(q);
	kvm_rpc_channel_close(ch);
	kvm_rpc_server_destroy(srv, 1000);
}

typedef struct stopper_arg {
	kvm_rpc_server *srv;
	atomic_int done;
} stopper_arg;

static void *stop_server(void *arg)
{
	stopper_arg *s = arg;
	kvm_rpc_server_destroy(s->srv, 3000);
	atomic_store(&s->done, 1);
	return NULL;
}

Test(rpc, server_stop_waits_for_deferred_calls_to_finish)
{
	int port;
	kvm_rpc_server *srv = start_server(&port);
	kvm_rpc_channel *ch = connect_to(port);
	kvm_rpc_queue *q;
	cr_assert_eq(kvm_rpc_queue_create(&q), 0);
	atomic_store(&later_ms, 500);
	cr_assert_eq(kvm_rpc_unary_start(ch, q, "/t.T/Later", "kept", 4, 5000, q), 0);
	usleep(100 * 1000); /* the handler has deferred it */
	stopper_arg s = {.srv = srv};
	pthread_t t;
	pthread_create(&t, NULL, stop_server, &s);
	void *tag, *resp;
	size_t len;
	kvm_rpc_status st;
	cr_assert_eq(kvm_rpc_queue_next(q, 5000, &tag, &resp, &len, &st), 1);
	cr_assert_eq(tag, q);
	cr_assert_eq(st.code, KVM_RPC_OK, "finished within the grace period: %d %s", st.code,
		     st.message);
	cr_assert_eq(len, 4);
	cr_assert(memcmp(resp, "kept", 4) == 0);
	free(resp);
	pthread_join(t, NULL);
	cr_assert(atomic_load(&s.done));
	atomic_store(&later_ms, 20);
	kvm_rpc_queue_destroy(q);
	kvm_rpc_channel_close(ch);
}

Test(rpc, async_queue_returns_each_call_once_with_its_own_reply)
{
	int port;
	kvm_rpc_server *srv = start_server(&port);
	kvm_rpc_channel *ch = connect_to(port);
	kvm_rpc_queue *q;
	cr_assert_eq(kvm_rpc_queue_create(&q), 0);
	enum { N = 200 };
	static bool seen[N];
	for (intptr_t i = 0; i < N; i++) {
		char msg[16];
		int n = snprintf(msg, sizeof(msg), "%ld", (long)i);
		const char *method = i % 10 == 9 ? "/t.T/NotFound" : i % 2 ? "/t.T/Later" : "/t.T/Echo";
		cr_assert_eq(kvm_rpc_unary_start(ch, q, method, msg, (size_t)n, 5000, (void *)i), 0);
	}
	void *tag, *resp;
	size_t len;
	kvm_rpc_status st;
	for (int k = 0; k < N; k++) {
		cr_assert_eq(kvm_rpc_queue_next(q, 5000, &tag, &resp, &len, &st), 1);
		intptr_t i = (intptr_t)tag;
		cr_assert(i >= 0 && i < N && !seen[i]);
		seen[i] = true;
		char msg[16];
		int n = snprintf(msg, sizeof(msg), "%ld", (long)i);
		if (i % 10 == 9) {
			cr_assert_eq(st.code, KVM_RPC_NOT_FOUND);
			cr_assert_null(resp);
		} else {
			cr_assert_eq(st.code, KVM_RPC_OK, "%d %s", st.code, st.message);
			cr_assert_eq(len, (size_t)n);
			cr_assert(memcmp(resp, msg, len) == 0);
			free(resp);
		}
	}
	cr_assert_eq(kvm_rpc_queue_next(q, 50, &tag, &resp, &len, &st), 0, "nothing left");
	/* A queue destroyed with calls in flight cancels them. */
	for (int i = 0; i < 4; i++)
		cr_assert_eq(kvm_rpc_unary_start(ch, q, "/t.T/Slow", "s", 1, 60000, NULL), 0);
	kvm_rpc_queue_destroy(q);
	kvm_rpc_channel_close(ch);
	kvm_rpc_server_destroy(srv, 1000);
}
