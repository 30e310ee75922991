/* Internal to coordinator/: the service's state, shared by coordinator.c
 * (nodes, models, events) and sequences.c (sequences and placement). One
 * mutex, c->mu, guards everything here; the ledger and store lock
 * themselves. Not a public header. */
#ifndef KVMESH_COORDINATOR_COORD_IMPL_H
#define KVMESH_COORDINATOR_COORD_IMPL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/rpc.h"
#include "coordinator/coordinator.h"
#include "coordinator/ledger.h"
#include "coordinator/state.h"
#include "proto/kvmesh.pb-c.h"

#define EVENT_RING 1024

typedef struct node_rec {
	char id[KVM_NODE_ID_MAX];
	uint8_t *reg; /* packed Kvmesh__V1__Node as registered */
	size_t reg_len;
	uint64_t epoch;
	Kvmesh__V1__NodeState state;
	uint64_t last_heartbeat_ms;
	double load;
	Kvmesh__V1__TierCapacity cap[2]; /* gpu, host */
	bool drain_pending;              /* a Drain command to send */
} node_rec;

typedef struct event_rec {
	uint64_t seq;
	uint8_t *bytes; /* packed Kvmesh__V1__Event */
	size_t len;
} event_rec;

struct kvm_coord {
	kvm_coord_config cfg;
	kvm_state *st;
	kvm_ledger *ledger;

	pthread_mutex_t mu;
	pthread_cond_t event_cv, stop_cv;
	node_rec *nodes;
	size_t n_nodes, cap_nodes;
	event_rec ring[EVENT_RING];
	uint64_t next_seq;
	uint64_t next_seq_id; /* for generated sequence ids */
	bool stopping;
	pthread_t liveness;
};

uint64_t coord_now_ms(void);
/* Packs m and sets it as the unary reply; returns the status to return. */
int coord_reply(kvm_rpc_call *call, const ProtobufCMessage *m);
/* 1-63 characters of [A-Za-z0-9._-]. */
bool coord_valid_id(const char *s);
/* With mu held. */
node_rec *coord_find_node(kvm_coord *c, const char *id);
/* Appends a packed event (seq and time filled in here) to the ring, waking
 * watchers; mu held. */
void coord_emit(kvm_coord *c, Kvmesh__V1__Event *ev);

/* sequences.c: the sequence calls, recovery of the ledger's reservations
 * from stored sequences at start, and marking sequences degraded when a node
 * dies (mu held). */
int coord_create_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int coord_extend_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int coord_get_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int coord_release_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int coord_recover_sequences(kvm_coord *c);
void coord_node_lost(kvm_coord *c, const char *node_id);

#endif
