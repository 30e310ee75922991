/* The standard gRPC health service (grpc.health.v1.Health: Check and Watch)
 * on a kvm_rpc_server, so that Kubernetes probes, load balancers and
 * grpc_health_probe see each daemon as they see any gRPC server. */
#ifndef KVMESH_COMMON_HEALTH_H
#define KVMESH_COMMON_HEALTH_H

#include <stdbool.h>

#include "common/rpc.h"

typedef struct kvm_health kvm_health;

/* Registers Check and Watch on srv (before kvm_rpc_server_start). The
 * overall service "" starts NOT_SERVING. *out is owned by the caller and
 * must outlive the server: destroy the server first, then kvm_health_destroy. */
int kvm_health_register(kvm_rpc_server *srv, kvm_health **out);

/* Sets a service's status ("" is the server as a whole), waking watchers.
 * A service never set is unknown: Check answers NOT_FOUND. */
int kvm_health_set(kvm_health *h, const char *service, bool serving);

void kvm_health_destroy(kvm_health *h);

#endif
