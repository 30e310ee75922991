/* The shared token: loading it from a file (mode, emptiness, newline,
 * characters), the constant-time compare, and the gRPC server's check over
 * real loopback calls (unary, streaming, unknown methods, the health service
 * left open). */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/auth.h"
#include "common/health.h"
#include "common/rpc.h"
#include "proto/health.pb-c.h"

static char dir[] = "/tmp/kvmesh-auth-XXXXXX";

static void mkdir_tmp(void)
{
	strcpy(dir, "/tmp/kvmesh-auth-XXXXXX");
	cr_assert_not_null(mkdtemp(dir));
}

/* Writes bytes to dir/name with mode; returns the path (static buffer). */
static const char *write_file(const char *name, const void *bytes, size_t n, mode_t mode)
{
	static char path[256];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	FILE *f = fopen(path, "w");
	cr_assert_not_null(f);
	cr_assert_eq(fwrite(bytes, 1, n, f), n);
	fclose(f);
	cr_assert_eq(chmod(path, mode), 0);
	return path;
}

static void rm_tmp(void)
{
	char cmd[300];
	snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
	cr_assert_eq(system(cmd), 0);
}

TestSuite(auth_file, .init = mkdir_tmp, .fini = rm_tmp);

Test(auth_file, loads_and_strips_the_newline)
{
	char tok[KVM_AUTH_TOKEN_MAX + 1], err[512] = "";
	const char *p = write_file("t", "s3cret-Token_1\n", 15, 0600);
	cr_assert_eq(kvm_auth_load_token(p, tok, sizeof tok, err, sizeof err), 0, "%s", err);
	cr_assert_str_eq(tok, "s3cret-Token_1");
	p = write_file("t2", "abc\r\n\n", 6, 0400);
	cr_assert_eq(kvm_auth_load_token(p, tok, sizeof tok, err, sizeof err), 0, "%s", err);
	cr_assert_str_eq(tok, "abc");
}

Test(auth_file, group_or_world_access_refused_with_the_fix)
{
	char tok[KVM_AUTH_TOKEN_MAX + 1] = "x", err[512] = "";
	static const mode_t bad[] = {0644, 0640, 0604, 0660, 0602};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		const char *p = write_file("t", "secret\n", 7, bad[i]);
		cr_assert_eq(kvm_auth_load_token(p, tok, sizeof tok, err, sizeof err), -EPERM, "mode %o", bad[i]);
		cr_assert(strstr(err, "chmod 600") && strstr(err, p), "message: %s", err);
		cr_assert_str_eq(tok, "", "nothing loaded");
	}
}

Test(auth_file, empty_missing_long_and_binary_refused)
{
	char tok[KVM_AUTH_TOKEN_MAX + 1], err[512] = "";
	const char *p = write_file("empty", "", 0, 0600);
	cr_assert_eq(kvm_auth_load_token(p, tok, sizeof tok, err, sizeof err), -EINVAL);
	cr_assert(strstr(err, "is empty"), "message: %s", err);
	p = write_file("nl", "\n\n", 2, 0600);
	cr_assert_eq(kvm_auth_load_token(p, tok, sizeof tok, err, sizeof err), -EINVAL);
	char path[300];
	snprintf(path, sizeof path, "%s/none", dir);
	cr_assert_eq(kvm_auth_load_token(path, tok, sizeof tok, err, sizeof err), -ENOENT);
	cr_assert(strstr(err, "cannot read") && strstr(err, path), "message: %s", err);
	static char big[KVM_AUTH_TOKEN_MAX + 10];
	memset(big, 'a', sizeof big);
	p = write_file("big", big, KVM_AUTH_TOKEN_MAX + 1, 0600);
	cr_assert_eq(kvm_auth_load_token(p, tok, sizeof tok, err, sizeof err), -E2BIG);
	p = write_file("max", big, KVM_AUTH_TOKEN_MAX, 0600);
	cr_assert_eq(kvm_auth_load_token(p, tok, sizeof tok, err, sizeof err), 0, "%s", err);
	cr_assert_eq(strlen(tok), KVM_AUTH_TOKEN_MAX);
	p = write_file("bin", "ab\001cd", 5, 0600);
	cr_assert_eq(kvm_auth_load_token(p, tok, sizeof tok, err, sizeof err), -EINVAL);
	cr_assert(strstr(err, "printable"), "message: %s", err);
	cr_assert_eq(kvm_auth_load_token(dir, tok, sizeof tok, err, sizeof err), -EINVAL, "a directory");
}

Test(auth, equal)
{
	cr_assert(kvm_auth_equal("abc", 3, "abc", 3));
	cr_assert_not(kvm_auth_equal("abd", 3, "abc", 3));
	cr_assert_not(kvm_auth_equal("ab", 2, "abc", 3));
	cr_assert_not(kvm_auth_equal("abcd", 4, "abc", 3));
	cr_assert_not(kvm_auth_equal("", 0, "abc", 3));
	cr_assert_not(kvm_auth_equal("", 0, "", 0), "an empty expected token matches nothing");
	/* A shorter presented token is not read past its end (ASan checks). */
	char *one = malloc(1);
	one[0] = 'a';
	cr_assert_not(kvm_auth_equal(one, 1, "abc", 3));
	free(one);
}

/* ---- the gRPC server's check ------------------------------------------------- */

static atomic_int handler_runs;
static kvm_rpc_server *srv;
static kvm_health *health;
static char target[64];

static int echo(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	(void)arg;
	atomic_fetch_add(&handler_runs, 1);
	kvm_rpc_reply(call, req, len);
	return KVM_RPC_OK;
}

static int two(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	(void)arg;
	(void)req;
	(void)len;
	atomic_fetch_add(&handler_runs, 1);
	kvm_rpc_send(call, "1", 1);
	kvm_rpc_send(call, "2", 1);
	return KVM_RPC_OK;
}

static void start(void)
{
	int port;
	atomic_store(&handler_runs, 0);
	cr_assert_eq(kvm_rpc_server_create("127.0.0.1:0", &port, &srv), 0);
	cr_assert_eq(kvm_rpc_server_set_token(srv, "the-token"), 0);
	cr_assert_eq(kvm_health_register(srv, &health), 0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Echo", KVM_RPC_UNARY, echo, NULL), 0);
	cr_assert_eq(kvm_rpc_server_add_method(srv, "/t.T/Two", KVM_RPC_STREAMING, two, NULL), 0);
	cr_assert_eq(kvm_rpc_server_start(srv), 0);
	cr_assert_eq(kvm_rpc_server_set_token(srv, "late"), -EINVAL, "only before start");
	kvm_health_set(health, "", true);
	snprintf(target, sizeof target, "127.0.0.1:%d", port);
}

static void stop(void)
{
	kvm_rpc_server_destroy(srv, 500);
	kvm_health_destroy(health);
}

TestSuite(auth_rpc, .init = start, .fini = stop, .timeout = 30);

static kvm_rpc_channel *channel(const char *token)
{
	kvm_rpc_channel *ch;
	cr_assert_eq(kvm_rpc_channel_open(target, &ch), 0);
	if (token)
		cr_assert_eq(kvm_rpc_channel_set_token(ch, token), 0);
	return ch;
}

static int unary(kvm_rpc_channel *ch, const char *method, kvm_rpc_status *st)
{
	void *resp = NULL;
	size_t len;
	cr_assert_eq(kvm_rpc_unary(ch, method, "hi", 2, 5000, &resp, &len, st), 0);
	if (st->code == KVM_RPC_OK)
		cr_assert(len == 2 && memcmp(resp, "hi", 2) == 0);
	free(resp);
	return st->code;
}

Test(auth_rpc, unary_without_or_with_a_wrong_token_is_unauthenticated)
{
	static const char *bad[] = {NULL, "the-tokeN", "the-toke", "the-token2", "Bearer the-token"};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		kvm_rpc_channel *ch = channel(bad[i]);
		kvm_rpc_status st;
		cr_assert_eq(unary(ch, "/t.T/Echo", &st), KVM_RPC_UNAUTHENTICATED, "token %s",
			     bad[i] ? bad[i] : "(none)");
		cr_assert_str_eq(st.message, "missing or wrong authorization token");
		/* Unknown methods are not told apart from known ones. */
		cr_assert_eq(unary(ch, "/t.T/Nope", &st), KVM_RPC_UNAUTHENTICATED);
		kvm_rpc_channel_close(ch);
	}
	cr_assert_eq(atomic_load(&handler_runs), 0, "no handler ran");
}

Test(auth_rpc, the_right_token_works_and_can_be_cleared)
{
	kvm_rpc_channel *ch = channel("the-token");
	kvm_rpc_status st;
	cr_assert_eq(unary(ch, "/t.T/Echo", &st), KVM_RPC_OK, "%s", st.message);
	cr_assert_eq(unary(ch, "/t.T/Nope", &st), KVM_RPC_UNIMPLEMENTED);
	cr_assert_eq(atomic_load(&handler_runs), 1);
	cr_assert_eq(kvm_rpc_channel_set_token(ch, NULL), 0);
	cr_assert_eq(unary(ch, "/t.T/Echo", &st), KVM_RPC_UNAUTHENTICATED);
	cr_assert_eq(kvm_rpc_channel_set_token(ch, "the-token"), 0);
	cr_assert_eq(unary(ch, "/t.T/Echo", &st), KVM_RPC_OK);
	kvm_rpc_channel_close(ch);
}

static int stream_all(kvm_rpc_channel *ch, int *msgs, kvm_rpc_status *out)
{
	kvm_rpc_stream *s;
	cr_assert_eq(kvm_rpc_stream_open(ch, "/t.T/Two", "", 0, 5000, &s), 0);
	void *m;
	size_t len;
	*msgs = 0;
	int rc;
	while ((rc = kvm_rpc_stream_next(s, &m, &len)) == 1) {
		free(m);
		(*msgs)++;
	}
	cr_assert_eq(rc, 0);
	*out = *kvm_rpc_stream_status(s);
	kvm_rpc_stream_close(s);
	return out->code;
}

Test(auth_rpc, streaming_calls_checked_too)
{
	kvm_rpc_channel *ch = channel(NULL);
	kvm_rpc_status st;
	int msgs;
	cr_assert_eq(stream_all(ch, &msgs, &st), KVM_RPC_UNAUTHENTICATED);
	cr_assert_eq(msgs, 0);
	cr_assert_str_eq(st.message, "missing or wrong authorization token");
	cr_assert_eq(kvm_rpc_channel_set_token(ch, "the-token"), 0);
	cr_assert_eq(stream_all(ch, &msgs, &st), KVM_RPC_OK, "%s", st.message);
	cr_assert_eq(msgs, 2);
	kvm_rpc_channel_close(ch);
	cr_assert_eq(atomic_load(&handler_runs), 1);
}

Test(auth_rpc, health_stays_open)
{
	Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
	req.service = "";
	uint8_t buf[64];
	size_t n = grpc__health__v1__health_check_request__pack(&req, buf);
	static const char *tokens[] = {NULL, "wrong"};
	for (int i = 0; i < 2; i++) {
		kvm_rpc_channel *ch = channel(tokens[i]);
		void *resp = NULL;
		size_t len;
		kvm_rpc_status st;
		cr_assert_eq(kvm_rpc_unary(ch, "/grpc.health.v1.Health/Check", buf, n, 5000, &resp, &len, &st), 0);
		cr_assert_eq(st.code, KVM_RPC_OK, "%s", st.message);
		Grpc__Health__V1__HealthCheckResponse *r =
			grpc__health__v1__health_check_response__unpack(NULL, len, resp);
		cr_assert_not_null(r);
		cr_assert_eq(r->status, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
		grpc__health__v1__health_check_response__free_unpacked(r, NULL);
		free(resp);
		kvm_rpc_channel_close(ch);
	}
}
