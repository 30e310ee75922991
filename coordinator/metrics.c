/* The coordinator's /metrics: the cluster as the coordinator sees it (nodes
 * by state, each node's pool as the ledger counts it, live sequences) and
 * the state store's work. Read at scrape time from state kept anyway. */
#include <stdio.h>
#include <stdlib.h>

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
       NODE_HEARTBEAT_AGE, NODE_CMDS_DROPPED, NODE_RESTARTS, N_NODE_METRICS };

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
	{"kvmesh_node_restarts_total", "counter",
	 "Times the node's agent registered as a new process before it was declared dead "
	 "(what it held was lost)."},
};

/* What one scrape reports of a node, copied under the lock. */
typedef struct node_row {
	char id[KVM_NODE_ID_MAX];
	Kvmesh__V1__NodeState state;
	double v[N_NODE_METRICS];
} node_row;

void kvm_coord_collect(void *arg, kvm_metrics_out *out)
{
	kvm_coord *c = arg;
	uint64_t now = coord_mono_ms();
	/* Copy under the lock, write after it: a scrape must not hold up the
	 * control path while it formats text. */
	pthread_mutex_lock(&c->mu);
	size_t n = c->n_nodes;
	node_row *rows = calloc(n ? n : 1, sizeof(*rows));
	for (size_t i = 0; rows && i < n; i++) {
		const node_rec *nd = &c->nodes[i];
		kvm_ledger_node ln = {0};
		kvm_ledger_node_get(c->ledger, nd->id, &ln); /* zeros if unknown */
		node_row *r = &rows[i];
		snprintf(r->id, sizeof(r->id), "%s", nd->id);
		r->state = nd->state;
		r->v[NODE_POOL] = (double)ln.total_blocks;
		r->v[NODE_USED] = (double)ln.used_blocks;
		r->v[NODE_LENT] = (double)ln.lent_blocks;
		r->v[NODE_BORROWED] = (double)ln.borrowed_blocks;
		r->v[NODE_EVICTABLE] = (double)ln.evictable_blocks;
		r->v[NODE_LOAD] = nd->load;
		r->v[NODE_HEARTBEAT_AGE] =
			now > nd->heard_ms ? (double)(now - nd->heard_ms) / 1e3 : 0;
		r->v[NODE_CMDS_DROPPED] = (double)nd->cmds_dropped;
		r->v[NODE_RESTARTS] = (double)nd->restarts;
	}
	const double seqs = (double)c->n_seqs, degraded = (double)c->degraded_total,
		     stalls = (double)c->stalls,
		     blks = (double)c->n_blks, moving = (double)c->n_moves,
		     events = (double)c->next_seq;
	pthread_mutex_unlock(&c->mu);
	if (!rows)
		n = 0; /* out of memory: the cluster-wide figures still go out */

	size_t by_state[5] = {0};
	for (size_t i = 0; i < n; i++)
		by_state[rows[i].state < 5 ? rows[i].state : 0]++;
	kvm_metrics_family(out, "kvmesh_nodes", "gauge", "Registered nodes by state.");
	for (int st = 1; st < 5; st++) {
		char labels[64];
		snprintf(labels, sizeof(labels), "state=\"%s\"",
			 coord_state_name((Kvmesh__V1__NodeState)st));
		kvm_metrics_sample(out, "kvmesh_nodes", labels, (double)by_state[st]);
	}
	kvm_metrics_family(out, "kvmesh_node_state", "gauge",
			   "1 for each node's current state (ready, cordoned, draining, dead).");
	char labels[LABELS_MAX];
	for (size_t i = 0; i < n; i++) {
		node_labels(labels, rows[i].id, coord_state_name(rows[i].state));
		kvm_metrics_sample(out, "kvmesh_node_state", labels, 1);
	}
	for (int k = 0; k < N_NODE_METRICS; k++) {
		kvm_metrics_family(out, node_metrics[k].name, node_metrics[k].type,
				   node_metrics[k].help);
		for (size_t i = 0; i < n; i++) {
			node_labels(labels, rows[i].id, NULL);
			kvm_metrics_sample(out, node_metrics[k].name, labels, rows[i].v[k]);
		}
	}
	free(rows);
	kvm_metrics_single(out, "kvmesh_sequences", "gauge", "Live sequences.", seqs);
	kvm_metrics_single(out, "kvmesh_sequences_degraded_total", "counter",
			   "Sequences marked degraded (blocks lost with a dead node).", degraded);
	kvm_metrics_single(out, "kvmesh_coordinator_stalls_total", "counter",
			   "Times the coordinator found it had not run for over a heartbeat "
			   "(heartbeat ages then do not count the stall).",
			   stalls);
	kvm_metrics_single(out, "kvmesh_prefix_index_blocks", "gauge",
			   "Full blocks in the cluster-wide prefix index.", blks);
	kvm_metrics_single(out, "kvmesh_blocks_moving", "gauge",
			   "Blocks being moved off draining nodes.", moving);
	kvm_metrics_single(out, "kvmesh_events_total", "counter",
			   "Node and sequence events emitted (WatchEvents).", events);

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
		{"kvmesh_state_log_full", "gauge",
		 "1 while the state log cannot grow (its disk is full): new state is refused "
		 "once its room is down to the reserve.",
		 ss.room_error ? 1.0 : 0.0},
		{"kvmesh_state_log_room_bytes", "gauge",
		 "Room left for records in the log's preallocated zeros.", (double)ss.room_bytes},
		{"kvmesh_state_refused_total", "counter",
		 "Changes refused because the state log had no room (a full disk).",
		 (double)ss.refused},
		{"kvmesh_state_snapshot_failures_total", "counter",
		 "Snapshots that failed (the log keeps the records; tried again later).",
		 (double)ss.snapshot_failures},
	};
	for (size_t i = 0; i < sizeof(store) / sizeof(store[0]); i++)
		kvm_metrics_single(out, store[i].name, store[i].type, store[i].help, store[i].v);
}
