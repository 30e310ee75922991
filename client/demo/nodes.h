/* What the coordinator and the agents say about the cluster, for the demo's
 * summary, the launcher's readiness check and the benchmarks. */
#ifndef KVMESH_CLIENT_DEMO_NODES_H
#define KVMESH_CLIENT_DEMO_NODES_H

#include <stdbool.h>
#include <stdint.h>

typedef struct demo_node {
	char id[64];
	char grpc[128];
	bool ready;
	int state;                            /* Kvmesh__V1__NodeState */
	uint64_t total, used, lent, borrowed; /* blocks, from the coordinator */
	uint64_t drain_left;                  /* draining: blocks still to move */
	uint32_t drain_homes;                 /* draining: sequences homed there */
	double data_bytes;                    /* agent Stats: data-plane bytes in + out (-1: none) */
} demo_node;

/* Lists up to cap nodes of the coordinator at `coordinator`; with_stats also
 * asks each agent for its data-plane counters. token: the cluster's shared
 * token (NULL or "": none). Returns the number of nodes (it may exceed cap;
 * only cap are filled) or a negative errno (-EACCES: the token was refused). */
int demo_list_nodes(const char *coordinator, const char *token, bool with_stats, demo_node *out,
		    int cap);

/* The node named id as the coordinator lists it (without agent Stats):
 * 0, -ENOENT, or an error as demo_list_nodes. */
int demo_find_node(const char *coordinator, const char *token, const char *id, demo_node *out);

/* An operator's call on a node, as kvmeshctl makes it: method "CordonNode",
 * "DrainNode" or "UncordonNode". 0, -ENOENT (unknown node), -EACCES, or
 * -EIO (refused, or no answer). */
int demo_node_admin(const char *coordinator, const char *token, const char *method, const char *id);

#endif
