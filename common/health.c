#include "common/health.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "proto/health.pb-c.h"

#define MAX_SERVICES 32
#define MAX_NAME 128

typedef Grpc__Health__V1__HealthCheckResponse__ServingStatus serving_status;

struct kvm_health {
	pthread_mutex_t mu;
	pthread_cond_t changed;
	unsigned n;
	char names[MAX_SERVICES][MAX_NAME];
	bool serving[MAX_SERVICES];
	unsigned long version; /* bumped on every change, for watchers */
};

/* The status of `service`; call with mu held. */
static serving_status status_of(const kvm_health *h, const char *service)
{
	for (unsigned i = 0; i < h->n; i++)
		if (strcmp(h->names[i], service) == 0)
			return h->serving[i] ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
					     : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
	return GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
}

/* Packs a response into buf (always small). */
static size_t pack_status(serving_status st, uint8_t *buf)
{
	Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
	resp.status = st;
	return grpc__health__v1__health_check_response__pack(&resp, buf);
}

static int unpack_service(kvm_rpc_call *call, const uint8_t *req, size_t len, char *service)
{
	Grpc__Health__V1__HealthCheckRequest *r =
		grpc__health__v1__health_check_request__unpack(NULL, len, req);
	if (!r)
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "malformed HealthCheckRequest");
	size_t n = strlen(r->service);
	if (n >= MAX_NAME) {
		grpc__health__v1__health_check_request__free_unpacked(r, NULL);
		return kvm_rpc_fail(call, KVM_RPC_INVALID_ARGUMENT, "service name over %d bytes",
				    MAX_NAME - 1);
	}
	memcpy(service, r->service, n + 1);
	grpc__health__v1__health_check_request__free_unpacked(r, NULL);
	return KVM_RPC_OK;
}

static int health_check(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_health *h = arg;
	char service[MAX_NAME];
	int rc = unpack_service(call, req, len, service);
	if (rc != KVM_RPC_OK)
		return rc;
	pthread_mutex_lock(&h->mu);
	serving_status st = status_of(h, service);
	pthread_mutex_unlock(&h->mu);
	if (st == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN)
		return kvm_rpc_fail(call, KVM_RPC_NOT_FOUND, "unknown service \"%s\"", service);
	uint8_t buf[16];
	kvm_rpc_reply(call, buf, pack_status(st, buf));
	return KVM_RPC_OK;
}

/* Sends the status now and after every change, until the client leaves. */
static int health_watch(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	kvm_health *h = arg;
	char service[MAX_NAME];
	int rc = unpack_service(call, req, len, service);
	if (rc != KVM_RPC_OK)
		return rc;
	serving_status last = (serving_status)-1;
	for (;;) {
		pthread_mutex_lock(&h->mu);
		serving_status st = status_of(h, service);
		if (st == last) {
			/* Wake up now and then to notice a cancelled call. */
			struct timespec until;
			clock_gettime(CLOCK_REALTIME, &until);
			until.tv_nsec += 100 * 1000 * 1000;
			if (until.tv_nsec >= 1000000000L) {
				until.tv_sec++;
				until.tv_nsec -= 1000000000L;
			}
			unsigned long v = h->version;
			while (v == h->version &&
			       pthread_cond_timedwait(&h->changed, &h->mu, &until) == 0)
				;
			st = status_of(h, service);
		}
		pthread_mutex_unlock(&h->mu);
		if (kvm_rpc_cancelled(call))
			return KVM_RPC_CANCELLED;
		if (st != last) {
			uint8_t buf[16];
			if (kvm_rpc_send(call, buf, pack_status(st, buf)) != 0)
				return KVM_RPC_CANCELLED;
			last = st;
		}
	}
}

int kvm_health_register(kvm_rpc_server *srv, kvm_health **out)
{
	if (!srv || !out)
		return -EINVAL;
	kvm_health *h = calloc(1, sizeof(*h));
	if (!h)
		return -ENOMEM;
	pthread_mutex_init(&h->mu, NULL);
	pthread_cond_init(&h->changed, NULL);
	h->n = 1; /* "" , not serving until the daemon says so */
	int rc = kvm_rpc_server_add_method(srv, "/grpc.health.v1.Health/Check", KVM_RPC_INLINE,
					   health_check, h);
	if (rc == 0)
		rc = kvm_rpc_server_add_method(srv, "/grpc.health.v1.Health/Watch", KVM_RPC_STREAMING,
					       health_watch, h);
	if (rc != 0) {
		kvm_health_destroy(h);
		return rc;
	}
	*out = h;
	return 0;
}

int kvm_health_set(kvm_health *h, const char *service, bool serving)
{
	if (!h || !service || strlen(service) >= MAX_NAME)
		return -EINVAL;
	pthread_mutex_lock(&h->mu);
	unsigned i = 0;
	while (i < h->n && strcmp(h->names[i], service) != 0)
		i++;
	if (i == h->n) {
		if (h->n == MAX_SERVICES) {
			pthread_mutex_unlock(&h->mu);
			return -ENOSPC;
		}
		strcpy(h->names[h->n++], service);
	}
	h->serving[i] = serving;
	h->version++;
	pthread_cond_broadcast(&h->changed);
	pthread_mutex_unlock(&h->mu);
	return 0;
}

void kvm_health_destroy(kvm_health *h)
{
	if (!h)
		return;
	pthread_cond_destroy(&h->changed);
	pthread_mutex_destroy(&h->mu);
	free(h);
}
