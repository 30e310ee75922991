/* The KV ledger (DistKV-LLM's gManager debt ledger): how many blocks each
 * node holds, for its own sequences and lent to others, and where a
 * sequence's next blocks go.
 *
 * A sequence's blocks go to its home node while it has room. Then the home
 * becomes a debtor and borrows from creditors, ranked by link bandwidth to
 * the home node, then by free blocks; a creditor lends at most its lending
 * cap (a share of its pool) and only from its own free memory (it never
 * borrows on someone else's behalf). When free blocks run out everywhere,
 * unreferenced cached blocks (evictable) are reclaimed, home first; when
 * even that is not enough the allocation fails whole with -ENOSPC, nothing
 * reserved. A node lends only to homes of its own model (micro-attention on
 * its blocks needs that model's geometry); a node whose model is unknown
 * ("") matches any. Pure bookkeeping: no I/O, thread-safe. */
#ifndef KVMESH_COORDINATOR_LEDGER_H
#define KVMESH_COORDINATOR_LEDGER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVM_NODE_ID_MAX 64
#define KVM_MODEL_ID_MAX 64

typedef struct kvm_ledger kvm_ledger;

typedef struct kvm_ledger_node {
	char id[KVM_NODE_ID_MAX];
	uint64_t total_blocks;     /* pool size */
	uint64_t used_blocks;      /* held by live sequences (own and lent) */
	uint64_t evictable_blocks; /* cached, unreferenced: reclaimable */
	uint64_t lent_blocks;      /* of used: held for other nodes' sequences */
	uint64_t borrowed_blocks;  /* this node's sequences' blocks held elsewhere */
	uint64_t lend_cap_blocks;  /* most it lends */
	bool schedulable;          /* false: cordoned, draining or dead */
	char model[KVM_MODEL_ID_MAX]; /* the model it serves ("": unknown) */
} kvm_ledger_node;

/* Where a request's blocks go: `blocks` new blocks on node `id`, of which
 * `evict` must first be reclaimed from that node's cache. */
typedef struct kvm_ledger_grant {
	char id[KVM_NODE_ID_MAX];
	uint64_t blocks;
	uint64_t evict;
} kvm_ledger_grant;

/* lend_share: the share (0..1) of each node's pool it may lend. */
int kvm_ledger_create(double lend_share, kvm_ledger **out);
void kvm_ledger_destroy(kvm_ledger *l);

/* Adds or updates a node from its registration or heartbeat: pool size,
 * cached evictable blocks, whether new blocks may go there. */
int kvm_ledger_node_set(kvm_ledger *l, const char *id, uint64_t total_blocks,
			uint64_t evictable_blocks, bool schedulable);
/* The model a node serves ("": unknown, lends to any home). -ENOENT for
 * an unknown node, -EINVAL for a model id that does not fit. */
int kvm_ledger_node_model(kvm_ledger *l, const char *id, const char *model);
/* Whether a node serving model a may hold blocks of model b: the same, or
 * either unknown (""). */
bool kvm_ledger_models_match(const char *a, const char *b);
/* Removes a node (dead): its used blocks are gone; the lent/borrowed counts
 * of the nodes it owed or lent to are corrected by the caller's releases. */
int kvm_ledger_node_remove(kvm_ledger *l, const char *id);

/* Link bandwidth between two nodes in Gbit/s (symmetric); unknown pairs
 * count as 0, ranked last. */
int kvm_ledger_link_set(kvm_ledger *l, const char *a, const char *b, double gbps);

/* Reserves n blocks for a sequence whose home is `home`, on the home and
 * on nodes of its model. Fills up to cap
 * grants (one per node used, home first) and *n_grants. Returns 0, -ENOENT
 * for an unknown home, -ENOSPC when the cluster has not enough room (nothing
 * reserved), -E2BIG when more than cap nodes would be needed. */
int kvm_ledger_reserve(kvm_ledger *l, const char *home, uint64_t n, kvm_ledger_grant *grants,
		       size_t cap, size_t *n_grants);

/* Records n blocks already held on `node` for a sequence whose home is
 * `home`, as reserve would have (used on recovery, from stored sequences).
 * Caps are not applied: the blocks exist. -ENOENT for an unknown node. */
int kvm_ledger_charge(kvm_ledger *l, const char *home, const char *node, uint64_t n);

/* Returns n blocks held on `node` for a sequence whose home is `home`. */
int kvm_ledger_release(kvm_ledger *l, const char *home, const char *node, uint64_t n);

/* A copy of one node's counters; -ENOENT if unknown. */
int kvm_ledger_node_get(kvm_ledger *l, const char *id, kvm_ledger_node *out);

#endif
