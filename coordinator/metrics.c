/* The coordinator's /metrics: the cluster as the coordinator sees it (nodes
 * by state, each node's pool as the ledger counts it, live sequences) and
 * the state store's work. Read at scrape time from state kept anyway. */
#include <stdio.h>

#include "coordinator/coord_impl.h"

#define LABELS_MAX (2 * KVM_NODE_ID_MAX + 48)

/* node="ID" (escaped), and state="STATE" when state is given. */
static void node_labels(char buf[LABELS_MAX], const char *node, const char *state)
{
	char id[2 * KVM_NODE_ID_MAX];
	kvm_metrics_escape(id, sizeof(id), node);
	if (state)
		snprintf(buf, LABELS_MAX, "node=\"%s\",state=\"%s\"", id, state);
	else
		snprintf(buf, LABELS_MAX, "node=\"%s\"", id);
}

/* One gauge (or counter) per node, from the ledger's view of it. */
enum { NODE_POOL, NODE_USED, NODE_LENT, NODE_BORROWED, NODE_EVICTABLE, NODE_LOAD,
       NODE_HEARTBEAT_AGE, NODE_CMDS_DROPPED, N_NODE_METRICS };

static const struct {
	const char *name, *type, *help;
} node_metrics[N_NODE_METRICS] = {
	{"kvmesh_node_pool_blocks", "gauge", "Blocks in the node's pool."},
	{"kvmesh_node_used_blocks", "gauge",
	 "Blocks of the node's pool held by live sequences (its own and lent)."},
	{"kvmesh_node_lent_blocks", "gauge",
	 "Blocks of the node's pool held for sequences homed on other nodes."},
	{"kvmesh_node_borrowed_blocks", "gauge",
	 "Blocks of sequences homed on the node that other nodes hold."},
	{"kvmesh_node_evictable_blocks", "gauge",
	 "Cached blocks no live sequence references (reclaimable)."},
	{"kvmesh_node_load", "gauge", "Load the node reported in its last heartbeat."},
	{"kvmesh_node_heartbeat_age_seconds", "gauge", "Time since the node's last heartbeat."},
	{"kvmesh_node_commands_dropped_total", "counter",
	 "Commands for the node dropped because its queue was full."},
};

void kvm_coord_collect(void *arg, kvm_metrics_out *out)
{
	kvm_coord *c = arg;
	uint64_t now = coord_now_ms();
	pthread_mutex_lock(&c->mu);
	size_t by_state[5] = {0};
	for (size_t i = 0; i < c->n_nodes; i++)
		by_state[c->nodes[i].state < 5 ? c->nodes[i].state : 0]++;
	kvm_metrics_family(out, "kvmesh_nodes", "gauge", "Registered nodes by state.");
	for (int s = 1; s < 5; s++) {
		char labels[64];
		snprintf(labels, sizeof(labels), "state=\"%s\"", coord_state_name((Kvmesh__V1__NodeState)s));
		kvm_metrics_sample(out, "kvmesh_nodes", labels, (double)by_state[s]);
	}
	kvm_metrics_family(out, "kvmesh_node_state", "gauge",
			   "1 for each node's current state (ready, cordoned, draining, dead).");
	for (size_t i = 0; i < c->n_nodes; i++) {
		char labels[LABELS_MAX];
		node_labels(labels, c->nodes[i].id, coord_state_name(c->nodes[i].state));
		kvm_metrics_sample(out, "kvmesh_node_state", labels, 1);
	}
	for (int k = 0; k < N_NODE_METRICS; k++) {
		kvm_metrics_family(out, node_metrics[k].name, node_metrics[k].type,
				   node_metrics[k].help);
		for (size_t i = 0; i < c->n_nodes; i++) {
			const node_rec *nd = &c->nodes[i];
			kvm_ledger_node ln = {0};
			kvm_ledger_node_get(c->ledger, nd->id, &ln); /* zeros if unknown */
			double v = 0;
			switch (k) {
			case NODE_POOL: v = (double)ln.total_blocks; break;
			case NODE_USED: v = (double)ln.used_blocks; break;
			case NODE_LENT: v = (double)ln.lent_blocks; break;
			case NODE_BORROWED: v = (double)ln.borrowed_blocks; break;
			case NODE_EVICTABLE: v = (double)ln.evictable_blocks; break;
			case NODE_LOAD: v = nd->load; break;
			case NODE_HEARTBEAT_AGE:
				v = now > nd->last_heartbeat_ms
					    ? (double)(now - nd->last_heartbeat_ms) / 1e3 : 0;
				break;
			case NODE_CMDS_DROPPED: v = (double)nd->cmds_dropped; break;
			}
			char labels[LABELS_MAX];
			node_labels(labels, nd->id, NULL);
			kvm_metrics_sample(out, node_metrics[k].name, labels, v);
		}
	}
	kvm_metrics_single(out, "kvmesh_sequences", "gauge", "Live sequences.", (double)c->n_seqs);
	kvm_metrics_single(out, "kvmesh_sequences_degraded_total", "counter",
			   "Sequences marked degraded (blocks lost with a dead node).",
			   (double)c->degraded_total);
	kvm_metrics_single(out, "kvmesh_prefix_index_blocks", "gauge",
			   "Full blocks in the cluster-wide prefix index.", (double)c->n_blks);
	kvm_metrics_single(out, "kvmesh_blocks_moving", "gauge",
			   "Blocks being moved off draining nodes.", (double)c->n_moves);
	kvm_metrics_single(out, "kvmesh_events_total", "counter",
			   "Node and sequence events emitted (WatchEvents).", (double)c->next_seq);
	pthread_mutex_unlock(&c->mu);

	kvm_state_stats ss;
	kvm_state_stats_get(c->st, &ss);
	const struct {
		const char *name, *type, *help;
		double v;
	} store[] = {
		{"kvmesh_state_records", "gauge", "Keys in the state store.", (double)ss.records},
		{"kvmesh_state_appends_total", "counter", "Records appended to the state log.",
		 (double)ss.appends},
		{"kvmesh_state_syncs_total", "counter",
		 "fdatasync calls on the state log (each covers every record queued before it).",
		 (double)ss.syncs},
		{"kvmesh_state_snapshots_total", "counter", "Snapshots written.",
		 (double)ss.snapshots},
		{"kvmesh_state_log_bytes", "gauge", "Bytes in the state log since the last snapshot.",
		 (double)ss.log_bytes},
		{"kvmesh_state_sync_seconds", "gauge", "Moving average of one sync's time.",
		 (double)kvm_state_sync_ns(c->st) / 1e9},
	};
	for (size_t i = 0; i < sizeof(store) / sizeof(store[0]); i++)
		kvm_metrics_single(out, store[i].name, store[i].type, store[i].help, store[i].v);
}
