/* The coordinator service: node registry with liveness, models, the KV
 * ledger, cluster events, served over gRPC (kvmesh.v1.Coordinator). Durable
 * records (nodes as registered, models) live in a kvm_state store.
 *
 * Every call of kvmesh.v1.Coordinator: the registry and commands on
 * heartbeats (coordinator.c), sequences with placement by the ledger and
 * prefix sharing (sequences.c), block reports, the soft block index and
 * MatchPrefix (blocks.c). */
#ifndef KVMESH_COORDINATOR_COORDINATOR_H
#define KVMESH_COORDINATOR_COORDINATOR_H

#include <stdint.h>

#include "common/rpc.h"
#include "coordinator/state.h"

typedef struct kvm_coord kvm_coord;

typedef struct kvm_coord_config {
	int64_t heartbeat_ms;  /* how often agents heartbeat */
	int64_t dead_after_ms; /* a node silent this long is dead */
	double lend_share;     /* share of each pool a node lends (0..1) */
} kvm_coord_config;

/* Creates the service over `st` (not owned; must outlive it), recovering
 * nodes and models from it, and registers its methods on srv (before
 * kvm_rpc_server_start). Starts the liveness thread. */
int kvm_coord_create(const kvm_coord_config *cfg, kvm_state *st, kvm_rpc_server *srv,
		     kvm_coord **out);

/* A kvm_metrics_collector (arg: the coordinator): nodes by state, each
 * node's pool as the ledger counts it, live and degraded sequences, the
 * state store's appends and syncs. */
void kvm_coord_collect(void *coord, kvm_metrics_out *out);

/* Stops the liveness thread and frees the service. Destroy the server first:
 * handlers may still be running until then. */
void kvm_coord_destroy(kvm_coord *c);

#endif
