/* The health service, from the C client and from a real Python gRPC client
 * built from proto/health.proto. */
#include <criterion/criterion.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/health.h"
#include "proto/health.pb-c.h"

extern char **environ;

static kvm_rpc_server *srv;
static kvm_health *health;
static int port;

static void start(void)
{
	cr_assert_eq(kvm_rpc_server_create("127.0.0.1:0", &port, &srv), 0);
	cr_assert_eq(kvm_health_register(srv, &health), 0);
	cr_assert_eq(kvm_rpc_server_start(srv), 0);
}

static void stop(void)
{
	kvm_rpc_server_destroy(srv, 500);
	kvm_health_destroy(health);
}

static int check(kvm_rpc_channel *ch, const char *service, int *status)
{
	Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
	req.service = (char *)service;
	uint8_t buf[256];
	size_t n = grpc__health__v1__health_check_request__pack(&req, buf);
	void *resp;
	size_t len;
	kvm_rpc_status st;
	cr_assert_eq(kvm_rpc_unary(ch, "/grpc.health.v1.Health/Check", buf, n, 5000, &resp, &len,
				   &st),
		     0);
	if (st.code == KVM_RPC_OK) {
		Grpc__Health__V1__HealthCheckResponse *r =
			grpc__health__v1__health_check_response__unpack(NULL, len, resp);
		cr_assert_not_null(r);
		*status = r->status;
		grpc__health__v1__health_check_response__free_unpacked(r, NULL);
		free(resp);
	}
	return st.code;
}

Test(health, check_follows_status, .init = start, .fini = stop)
{
	char target[64];
	snprintf(target, sizeof(target), "127.0.0.1:%d", port);
	kvm_rpc_channel *ch;
	cr_assert_eq(kvm_rpc_channel_open(target, &ch), 0);
	int st = -1;
	cr_assert_eq(check(ch, "", &st), KVM_RPC_OK);
	cr_assert_eq(st, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING);
	kvm_health_set(health, "", true);
	cr_assert_eq(check(ch, "", &st), KVM_RPC_OK);
	cr_assert_eq(st, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	cr_assert_eq(check(ch, "kvmesh.Agent", &st), KVM_RPC_NOT_FOUND);
	kvm_health_set(health, "kvmesh.Agent", true);
	cr_assert_eq(check(ch, "kvmesh.Agent", &st), KVM_RPC_OK);
	/* Garbage is a clear error, not a crash. */
	void *resp;
	size_t len;
	kvm_rpc_status s;
	cr_assert_eq(kvm_rpc_unary(ch, "/grpc.health.v1.Health/Check", "\xff\xff\xff", 3, 5000,
				   &resp, &len, &s),
		     0);
	cr_assert_eq(s.code, KVM_RPC_INVALID_ARGUMENT);
	kvm_rpc_channel_close(ch);
}

Test(health, watch_streams_changes, .init = start, .fini = stop)
{
	char target[64];
	snprintf(target, sizeof(target), "127.0.0.1:%d", port);
	kvm_rpc_channel *ch;
	cr_assert_eq(kvm_rpc_channel_open(target, &ch), 0);
	Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
	req.service = "";
	uint8_t buf[64];
	size_t n = grpc__health__v1__health_check_request__pack(&req, buf);
	kvm_rpc_stream *s;
	cr_assert_eq(kvm_rpc_stream_open(ch, "/grpc.health.v1.Health/Watch", buf, n, 10000, &s), 0);
	int want[3] = {GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING,
		       GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING,
		       GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING};
	for (int i = 0; i < 3; i++) {
		void *msg;
		size_t len;
		cr_assert_eq(kvm_rpc_stream_next(s, &msg, &len), 1);
		Grpc__Health__V1__HealthCheckResponse *r =
			grpc__health__v1__health_check_response__unpack(NULL, len, msg);
		cr_assert_eq((int)r->status, want[i]);
		grpc__health__v1__health_check_response__free_unpacked(r, NULL);
		free(msg);
		kvm_health_set(health, "", i == 0);
	}
	kvm_rpc_stream_close(s);
	kvm_rpc_channel_close(ch);
}

Test(health, real_python_grpc_client, .init = start, .fini = stop, .timeout = 60)
{
	if (access("/usr/bin/python3", X_OK) != 0)
		cr_skip_test("/usr/bin/python3 is missing: run deploy/deps.sh");
	kvm_health_set(health, "", true);
	char target[64];
	snprintf(target, sizeof(target), "127.0.0.1:%d", port);
	char *argv[] = {"/usr/bin/python3", "tests/clients/health_client.py", target, NULL};
	pid_t pid;
	/* posix_spawn, not fork: gRPC must not be forked after grpc_init. */
	cr_assert_eq(posix_spawn(&pid, argv[0], NULL, NULL, argv, environ), 0);
	int status;
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "python client failed: %d",
		  status);
}
