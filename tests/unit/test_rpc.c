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
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Echo", false, echo, NULL), 0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/NotFound", false, not_found, NULL), 0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Slow", false, slow, NULL), 0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Count", true, count, NULL), 0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Echo", false, echo, NULL), -EEXIST);
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
