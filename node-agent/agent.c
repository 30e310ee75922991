/* kvmesh-agent: the node agent daemon.
 *
 * One agent holds the KV blocks of one model's instances on this node (as
 * DistKV-LLM's per-instance rManager): it learns the model's block geometry
 * from the coordinator, sizes its block pool from --host-pool, registers,
 * heartbeats its capacity and load, and registers again whenever the
 * coordinator no longer knows it (a coordinator restart, or being declared
 * dead). After every registration it reports the blocks it holds in full.
 * It serves the health service, Agent.* over gRPC (blocks.c, homeseq.c)
 * and the data plane on --data-address. Heartbeat responses carry commands:
 * ReleaseBlocks (unpin), ReleaseSequence (drop a home sequence), Drain.
 * SIGTERM: stop serving, say so in the health service, exit cleanly. */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "common/config.h"
#include "common/health.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/rpc.h"
#include "kvstore/arena.h"
#include "kvstore/store.h"
#include "proto/kvmesh.pb-c.h"
#include "coordinator/links.h"
#include "node-agent/agent.h"
#include "transport/nic.h"
#include "transport/transport.h"
#include <xxhash.h>

static int rpc_call(kvm_rpc_channel *ch, const char *path, const ProtobufCMessage *req,
		    int64_t timeout_ms, void **resp, size_t *len, char *msg, size_t msg_len)
{
	size_t n = protobuf_c_message_get_packed_size(req);
	uint8_t *buf = malloc(n ? n : 1);
	if (!buf)
		return KVM_RPC_RESOURCE_EXHAUSTED;
	protobuf_c_message_pack(req, buf);
	kvm_rpc_status st;
	int rc = kvm_rpc_unary(ch, path, buf, n, (int)timeout_ms, resp, len, &st);
	free(buf);
	if (rc != 0) {
		snprintf(msg, msg_len, "%s", strerror(-rc));
		return KVM_RPC_UNAVAILABLE;
	}
	snprintf(msg, msg_len, "%s", st.message);
	return st.code;
}

int agent_coord_call(agent *a, const char *method, const ProtobufCMessage *req, void **resp,
		     size_t *len, char *msg, size_t msg_len)
{
	char path[128];
	snprintf(path, sizeof(path), "/kvmesh.v1.Coordinator/%s", method);
	return rpc_call(a->coord, path, req, a->call_timeout_ms, resp, len, msg, msg_len);
}

int agent_peer_call_ms(kvm_rpc_channel *ch, const char *method, const ProtobufCMessage *req,
		       int64_t timeout_ms, void **resp, size_t *len, char *msg, size_t msg_len)
{
	char path[128];
	snprintf(path, sizeof(path), "/kvmesh.v1.Agent/%s", method);
	return rpc_call(ch, path, req, timeout_ms, resp, len, msg, msg_len);
}

int agent_peer_call(agent *a, kvm_rpc_channel *ch, const char *method, const ProtobufCMessage *req,
		    void **resp, size_t *len, char *msg, size_t msg_len)
{
	return agent_peer_call_ms(ch, method, req, a->call_timeout_ms, resp, len, msg, msg_len);
}

static int coord_call(agent *a, const char *method, const ProtobufCMessage *req, void **resp,
		      size_t *len, char *msg, size_t msg_len)
{
	return agent_coord_call(a, method, req, resp, len, msg, msg_len);
}

uint64_t agent_data_id(const char *seq_id)
{
	return XXH3_64bits(seq_id, strlen(seq_id));
}

uint64_t agent_epoch(agent *a)
{
	pthread_mutex_lock(&a->mu);
	uint64_t e = a->epoch;
	pthread_mutex_unlock(&a->mu);
	return e;
}

/* Sleeps up to ms, or until the agent stops; returns true if stopping. */
static bool nap(agent *a, int64_t ms)
{
	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += ms / 1000;
	until.tv_nsec += (ms % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L)
		until.tv_sec++, until.tv_nsec -= 1000000000L;
	pthread_mutex_lock(&a->mu);
	while (!a->stopping && pthread_cond_timedwait(&a->cv, &a->mu, &until) == 0)
		;
	bool stop = a->stopping;
	pthread_mutex_unlock(&a->mu);
	return stop;
}

/* Waits until the coordinator knows the model, then takes its geometry. */
static int fetch_model(agent *a)
{
	for (int attempt = 0;; attempt++) {
		Kvmesh__V1__ListModelsRequest req = KVMESH__V1__LIST_MODELS_REQUEST__INIT;
		void *resp = NULL;
		size_t len;
		char msg[512];
		int code = coord_call(a, "ListModels", &req.base, &resp, &len, msg, sizeof(msg));
		if (code == KVM_RPC_OK) {
			Kvmesh__V1__ListModelsResponse *r =
				kvmesh__v1__list_models_response__unpack(NULL, len, resp);
			free(resp);
			bool found = false;
			for (size_t i = 0; r && i < r->n_models; i++) {
				const Kvmesh__V1__Model *m = r->models[i];
				if (strcmp(m->id, a->model_id) != 0 || !m->geometry)
					continue;
				static const da_dtype dt[] = {DA_F32, DA_F32, DA_F16, DA_BF16};
				a->q_heads = m->q_heads;
				a->geom = (kvs_geom){.layers = m->geometry->layers,
						     .kv_heads = m->geometry->kv_heads,
						     .head_dim = m->geometry->head_dim,
						     .block_tokens = m->geometry->block_tokens,
						     .dtype = dt[m->geometry->dtype & 3]};
				found = true;
			}
			if (r)
				kvmesh__v1__list_models_response__free_unpacked(r, NULL);
			if (found)
				return 0;
			snprintf(msg, sizeof(msg), "model %s is not registered yet", a->model_id);
		}
		if (attempt % 10 == 0)
			kvm_log(KVM_LOG_WARN, "waiting_for_model", "model=%s coordinator=%s reason=\"%s\"",
				a->model_id, a->coordinator, msg);
		if (nap(a, 500))
			return -ECANCELED;
	}
}

static void fill_capacity(agent *a, Kvmesh__V1__TierCapacity *host)
{
	kvs_store_stats st;
	kvs_store_get_stats(a->store, &st);
	/* The tail reserve is never offered to the ledger: tails live on the
	 * home node even when the ledger placed their block elsewhere. */
	uint32_t cap = st.tier[0].capacity, res = a->tail_reserve;
	uint32_t res_left = res > st.tier[0].tails ? res - st.tier[0].tails : 0;
	uint32_t total = cap > res ? cap - res : 0;
	uint32_t free_ = st.tier[0].free > res_left ? st.tier[0].free - res_left : 0;
	host->tier = KVMESH__V1__TIER__TIER_HOST;
	host->total_blocks = total;
	host->free_blocks = free_ < total ? free_ : total;
	host->evictable_blocks = st.tier[0].evictable;
	uint64_t used = (uint64_t)total - host->free_blocks;
	host->used_blocks = used > st.tier[0].evictable ? used - st.tier[0].evictable : 0;
}

static double load_now(void)
{
	double l[1];
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	return getloadavg(l, 1) == 1 && n > 0 ? l[0] / (double)n : 0.0;
}

/* NUMA nodes the kernel reports (sysfs, as transport/nic.c reads a NIC's
 * node); 1 where there is no NUMA information. */
static uint32_t numa_nodes(void)
{
	uint32_t n = 0;
	DIR *d = opendir("/sys/devices/system/node");
	struct dirent *e;
	while (d && (e = readdir(d)) != NULL)
		if (strncmp(e->d_name, "node", 4) == 0 && e->d_name[4] >= '0' && e->d_name[4] <= '9')
			n++;
	if (d)
		closedir(d);
	return n ? n : 1;
}

static int register_node(agent *a)
{
	Kvmesh__V1__Node node = KVMESH__V1__NODE__INIT;
	Kvmesh__V1__Hardware hw = KVMESH__V1__HARDWARE__INIT;
	Kvmesh__V1__TierCapacity host = KVMESH__V1__TIER_CAPACITY__INIT, *caps[1] = {&host};
	struct sysinfo si;
	sysinfo(&si);
	hw.cores = (uint32_t)sysconf(_SC_NPROCESSORS_ONLN);
	hw.memory_bytes = (uint64_t)si.totalram * si.mem_unit;
	hw.numa_nodes = numa_nodes();
	/* The NICs decide how the coordinator ranks this node as a creditor and
	 * which transport peers use. */
	static nic_report nics;
	Kvmesh__V1__Nic pn[NIC_MAX], *pp[NIC_MAX];
	if (nic_discover(&nics) == 0) {
		hw.n_nics = kvm_nics_to_proto(&nics, pn, NIC_MAX);
		for (size_t i = 0; i < hw.n_nics; i++)
			pp[i] = &pn[i];
		hw.nics = pp;
	}
	Kvmesh__V1__Gpu pg[GPU_MAX], *pgp[GPU_MAX];
	hw.n_gpus = gpus_to_proto(&a->gpus, pg, GPU_MAX);
	for (size_t i = 0; i < hw.n_gpus; i++)
		pgp[i] = &pg[i];
	hw.gpus = pgp;
	node.id = a->node_id;
	node.grpc_address = a->listen;
	node.data_address = a->data_address;
	node.model_id = a->model_id; /* its blocks go to sequences of this model only */
	node.hardware = &hw;
	fill_capacity(a, &host);
	node.n_capacity = 1;
	node.capacity = caps;
	node.load = load_now();
	node.incarnation = a->incarnation;
	Kvmesh__V1__RegisterNodeRequest req = KVMESH__V1__REGISTER_NODE_REQUEST__INIT;
	req.node = &node;
	void *resp = NULL;
	size_t len;
	char msg[512];
	int code = coord_call(a, "RegisterNode", &req.base, &resp, &len, msg, sizeof(msg));
	if (code != KVM_RPC_OK) {
		kvm_log(KVM_LOG_WARN, "register_failed", "coordinator=%s code=%d reason=\"%s\"",
			a->coordinator, code, msg);
		return -EAGAIN;
	}
	Kvmesh__V1__RegisterNodeResponse *r =
		kvmesh__v1__register_node_response__unpack(NULL, len, resp);
	free(resp);
	if (!r)
		return -EPROTO;
	pthread_mutex_lock(&a->mu);
	a->epoch = r->epoch;
	a->registered = true;
	pthread_mutex_unlock(&a->mu);
	a->heartbeat_ms = r->heartbeat_ms ? r->heartbeat_ms : 1000;
	kvmesh__v1__register_node_response__free_unpacked(r, NULL);
	kvm_log(KVM_LOG_INFO, "registered", "node=%s epoch=%" PRIu64 " heartbeat_ms=%u blocks=%" PRIu64,
		a->node_id, a->epoch, a->heartbeat_ms, host.total_blocks);
	return 0;
}

static void apply_commands(agent *a, const Kvmesh__V1__HeartbeatResponse *r)
{
	for (size_t i = 0; i < r->n_commands; i++) {
		const Kvmesh__V1__Command *c = r->commands[i];
		switch (c->kind_case) {
		case KVMESH__V1__COMMAND__KIND_RELEASE: {
			uint32_t bad = 0;
			for (size_t k = 0; k < c->release->n_handles; k++) {
				const Kvmesh__V1__BlockHandle *h = c->release->handles[k];
				if (blocks_release(a, (kvs_handle)h->generation << 32 | h->slot) != 0)
					bad++;
			}
			kvm_log(bad ? KVM_LOG_WARN : KVM_LOG_DEBUG, "release_blocks",
				"blocks=%zu not_held=%u", c->release->n_handles, bad);
			break;
		}
		case KVMESH__V1__COMMAND__KIND_RELEASE_SEQUENCE:
			homeseq_release(a, c->release_sequence->sequence_id,
					c->release_sequence->data_id);
			break;
		case KVMESH__V1__COMMAND__KIND_DRAIN: {
			/* The coordinator places nothing new here any more. What this
			 * node can give up at once is its cache: blocks no live
			 * sequence pins. Pinned blocks are served until released. */
			uint32_t evicted = 0;
			kvs_store_evict(a->store, KVS_TIER_FAST, UINT32_MAX, &evicted);
			kvm_log(KVM_LOG_INFO, "drain_requested", "reason=\"%s\" evicted=%u pinned=%u", c->drain->reason,
				evicted, blocks_pinned(a));
			break;
		}
		case KVMESH__V1__COMMAND__KIND_HAND_OFF:
			homeseq_hand_off(a, c->hand_off->sequence_id, c->hand_off->data_id,
					 c->hand_off->target_node, c->hand_off->target_address,
					 c->hand_off->home_epoch);
			break;
		case KVMESH__V1__COMMAND__KIND_MOVE: {
			int rc = blocks_move(a, c->move);
			kvm_log(rc ? KVM_LOG_WARN : KVM_LOG_INFO, "move_blocks", "blocks=%zu error=\"%s\"",
				c->move->n_moves, rc ? strerror(-rc) : "none");
			break;
		}
		default:
			break;
		}
	}
}

void agent_heartbeat_now(agent *a)
{
	pthread_mutex_lock(&a->hb_mu);
	Kvmesh__V1__HeartbeatRequest req = KVMESH__V1__HEARTBEAT_REQUEST__INIT;
	Kvmesh__V1__TierCapacity host = KVMESH__V1__TIER_CAPACITY__INIT, *caps[1] = {&host};
	fill_capacity(a, &host);
	req.node_id = a->node_id;
	req.epoch = agent_epoch(a);
	req.n_capacity = 1;
	req.capacity = caps;
	req.load = load_now();
	void *resp = NULL;
	size_t len;
	char msg[512];
	int code = coord_call(a, "Heartbeat", &req.base, &resp, &len, msg, sizeof(msg));
	if (code == KVM_RPC_NOT_FOUND || code == KVM_RPC_FAILED_PRECONDITION) {
		kvm_log(KVM_LOG_INFO, "reregistering", "reason=\"%s\"", msg);
		pthread_mutex_lock(&a->mu);
		a->registered = false;
		pthread_mutex_unlock(&a->mu);
		homeseq_recheck_all(a);
	} else if (code != KVM_RPC_OK) {
		kvm_log(KVM_LOG_WARN, "heartbeat_failed", "code=%d reason=\"%s\"", code, msg);
	} else {
		Kvmesh__V1__HeartbeatResponse *r =
			kvmesh__v1__heartbeat_response__unpack(NULL, len, resp);
		if (r) {
			apply_commands(a, r);
			kvmesh__v1__heartbeat_response__free_unpacked(r, NULL);
		}
	}
	free(resp);
	pthread_mutex_unlock(&a->hb_mu);
}

/* Registers (then reports every block held), then heartbeats; registers
 * again when told to. */
static void *heartbeat_main(void *arg)
{
	agent *a = arg;
	int64_t backoff = 200;
	for (;;) { /* until nap() says the agent stops */
		pthread_mutex_lock(&a->mu);
		bool registered = a->registered;
		pthread_mutex_unlock(&a->mu);
		if (!registered) {
			if (register_node(a) != 0) {
				if (nap(a, backoff))
					break;
				backoff = backoff < 5000 ? backoff * 2 : 5000;
				continue;
			}
			backoff = 200;
			/* The coordinator's block index is soft state: rebuilt from
			 * this report after its restart or our re-registration. */
			blocks_report_all(a);
		}
		if (nap(a, a->heartbeat_ms))
			break;
		agent_heartbeat_now(a);
		homeseq_expire(a);
	}
	return NULL;
}

/* The agent's counters, for the Stats call (by name) and /metrics
 * (kvmesh_agent_NAME, with _total for counters). */
enum { N_COUNTERS = 20 };
static const struct {
	const char *name;
	bool counter; /* else a gauge */
	const char *help;
} agent_counter[N_COUNTERS] = {
	{"sequences", false, "Sequences with blocks in this agent's store."},
	{"indexed_blocks", false, "Full blocks in the local prefix index."},
	{"prefix_hits", true, "Prefix lookups that found a stored block."},
	{"prefix_misses", true, "Prefix lookups that found none."},
	{"evictions", true, "Cached blocks evicted to make room."},
	{"meta_bytes_per_block", false, "Bookkeeping bytes per block slot."},
	{"pinned_blocks", false, "Blocks pinned by readers."},
	{"tail_blocks", false, "Tail (mutable, last) blocks of sequences."},
	{"home_sequences", false, "Sequences homed on this agent."},
	{"slots_used", false, "Slots of the host pool in use."},
	{"data_bytes_in", true, "Data-plane bytes received by this agent's data server."},
	{"data_bytes_out", true, "Data-plane bytes sent by this agent's data server."},
	{"data_frames_in", true, "Data-plane frames received."},
	{"data_proto_errors", true, "Data-plane frames refused as malformed."},
	{"data_server_rdma", false, "1 when the data server also serves RDMA verbs."},
	{"rdma_peers", false, "Peers reached over RDMA."},
	{"rdma_fallbacks", true, "Peers that fell back from RDMA to TCP."},
	{"hand_offs", true, "Sequences homed here handed to another agent (a drain)."},
	{"hand_off_failures", true, "Hand-offs that did not happen (asked again later)."},
	{"adoptions", true, "Sequences adopted from a draining home."},
};

static void agent_counter_values(agent *a, double vals[N_COUNTERS])
{
	kvs_store_stats st;
	kvs_store_get_stats(a->store, &st);
	/* The data server's traffic: every data-plane byte this node received
	 * or sent as a server (clients and other agents' requests to it). */
	xport_stats xs = {0};
	if (a->data_srv)
		xport_server_stats(a->data_srv, &xs);
	const double v[N_COUNTERS] = {
		st.n_seqs, st.n_indexed, (double)st.hits, (double)st.misses, (double)st.evictions,
		st.meta_bytes_per_block, blocks_pinned(a), st.tier[0].tails, homeseq_count(a),
		st.tier[0].used, (double)xs.bytes_in, (double)xs.bytes_out, (double)xs.frames_in,
		(double)xs.proto_errors, a->data_rdma ? 1.0 : 0.0,
		(double)__atomic_load_n(&a->rdma_peers, __ATOMIC_RELAXED),
		(double)__atomic_load_n(&a->rdma_fallbacks, __ATOMIC_RELAXED),
		(double)__atomic_load_n(&a->hand_offs, __ATOMIC_RELAXED),
		(double)__atomic_load_n(&a->hand_off_failures, __ATOMIC_RELAXED),
		(double)__atomic_load_n(&a->adoptions, __ATOMIC_RELAXED)};
	memcpy(vals, v, sizeof(v));
}

static int agent_stats(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{
	agent *a = arg;
	(void)req;
	(void)len;
	Kvmesh__V1__TierCapacity host = KVMESH__V1__TIER_CAPACITY__INIT, *caps[1] = {&host};
	fill_capacity(a, &host);
	double vals[N_COUNTERS];
	agent_counter_values(a, vals);
	Kvmesh__V1__StatsResponse__CountersEntry e[N_COUNTERS];
	Kvmesh__V1__StatsResponse__CountersEntry *ep[N_COUNTERS];
	for (int i = 0; i < N_COUNTERS; i++) {
		kvmesh__v1__stats_response__counters_entry__init(&e[i]);
		e[i].key = (char *)agent_counter[i].name;
		e[i].value = vals[i];
		ep[i] = &e[i];
	}
	Kvmesh__V1__StatsResponse resp = KVMESH__V1__STATS_RESPONSE__INIT;
	resp.n_capacity = 1;
	resp.capacity = caps;
	resp.n_counters = N_COUNTERS;
	resp.counters = ep;
	uint8_t buf[2048];
	size_t n = kvmesh__v1__stats_response__pack(&resp, buf);
	kvm_rpc_reply(call, buf, n);
	return KVM_RPC_OK;
}

/* /metrics: the pool as the ledger is told it, and the Stats counters. */
static void agent_collect(void *arg, kvm_metrics_out *out)
{
	agent *a = arg;
	Kvmesh__V1__TierCapacity host = KVMESH__V1__TIER_CAPACITY__INIT;
	fill_capacity(a, &host);
	kvm_metrics_family(out, "kvmesh_agent_pool_blocks", "gauge",
			   "Blocks of the pool offered to the ledger, by state (used: held by "
			   "live sequences; evictable: cached, unreferenced).");
	const struct {
		const char *state;
		uint64_t v;
	} pool[] = {{"total", host.total_blocks},
		    {"free", host.free_blocks},
		    {"used", host.used_blocks},
		    {"evictable", host.evictable_blocks}};
	for (size_t i = 0; i < sizeof(pool) / sizeof(pool[0]); i++) {
		char labels[64];
		snprintf(labels, sizeof(labels), "tier=\"host\",state=\"%s\"", pool[i].state);
		kvm_metrics_sample(out, "kvmesh_agent_pool_blocks", labels, (double)pool[i].v);
	}
	kvm_metrics_family(out, "kvmesh_agent_attend_seconds", "histogram",
			   "Time of a home attention batch: local partial, peers' partials, merge.");
	kvm_metrics_histogram(out, "kvmesh_agent_attend_seconds", NULL, &a->attend_latency);
	kvm_metrics_single(out, "kvmesh_agent_attend_queries_total", "counter",
			   "Queries of home attention batches.",
			   (double)__atomic_load_n(&a->attend_queries, __ATOMIC_RELAXED));
	kvm_metrics_single(out, "kvmesh_agent_attend_failed_total", "counter",
			   "Queries of home attention batches that failed (a peer down or late, "
			   "bad input).",
			   (double)__atomic_load_n(&a->attend_failed, __ATOMIC_RELAXED));
	double vals[N_COUNTERS];
	agent_counter_values(a, vals);
	for (int i = 0; i < N_COUNTERS; i++) {
		char name[96];
		snprintf(name, sizeof(name), "kvmesh_agent_%s%s", agent_counter[i].name,
			 agent_counter[i].counter ? "_total" : "");
		kvm_metrics_single(out, name, agent_counter[i].counter ? "counter" : "gauge",
				   agent_counter[i].help, vals[i]);
	}
}

struct sig_args {
	agent *a;
	sigset_t sigs;
};

static void *signal_main(void *arg)
{
	struct sig_args *sa = arg;
	int sig;
	sigwait(&sa->sigs, &sig);
	kvm_log(KVM_LOG_INFO, "stopping", "signal=%s", strsignal(sig));
	pthread_mutex_lock(&sa->a->mu);
	/* Once serving, main drains first; heartbeats go on meanwhile. */
	if (!sa->a->serving)
		sa->a->stopping = true;
	pthread_cond_broadcast(&sa->a->cv);
	pthread_mutex_unlock(&sa->a->mu);
	return NULL;
}

/* This node as the coordinator lists it (NULL if it cannot say). */
static Kvmesh__V1__ListNodesResponse *list_nodes(agent *a, const Kvmesh__V1__Node **self)
{
	Kvmesh__V1__ListNodesRequest req = KVMESH__V1__LIST_NODES_REQUEST__INIT;
	void *resp = NULL;
	size_t len;
	char msg[512];
	*self = NULL;
	if (coord_call(a, "ListNodes", &req.base, &resp, &len, msg, sizeof msg) != KVM_RPC_OK)
		return NULL;
	Kvmesh__V1__ListNodesResponse *r = kvmesh__v1__list_nodes_response__unpack(NULL, len, resp);
	free(resp);
	for (size_t i = 0; r && i < r->n_nodes && !*self; i++)
		if (strcmp(r->nodes[i]->id, a->node_id) == 0)
			*self = r->nodes[i];
	return r;
}

/* SIGTERM drains before the agent stops: the coordinator moves the blocks
 * that sequences homed elsewhere keep here, while this agent still serves
 * them and heartbeats (moves come on heartbeats), and hands the sequences
 * homed here to other agents (HandOff; when no node can take them, they get
 * time to end: their front-ends release them, no new ones come). The wait
 * ends when nothing is left, at --drain-timeout, when blocks are left but
 * nothing moved for 5 s (no room elsewhere, or the cluster is stopping too),
 * or on a second signal. */
#define DRAIN_STUCK_MS 5000

int64_t agent_mono_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void drain_before_exit(agent *a, const sigset_t *sigs)
{
	Kvmesh__V1__NodeRequest req = KVMESH__V1__NODE_REQUEST__INIT;
	req.node_id = a->node_id;
	void *resp = NULL;
	size_t len;
	char msg[512];
	int code = coord_call(a, "DrainNode", &req.base, &resp, &len, msg, sizeof msg);
	free(resp);
	if (code != KVM_RPC_OK) {
		kvm_log(KVM_LOG_WARN, "drain_skipped", "error=\"%s\"", msg);
		return;
	}
	int64_t t0 = agent_mono_ms(), moved_at = t0;
	uint64_t last = UINT64_MAX;
	uint32_t last_homed = UINT32_MAX;
	for (;;) {
		const Kvmesh__V1__Node *self;
		Kvmesh__V1__ListNodesResponse *r = list_nodes(a, &self);
		uint64_t left = self ? self->drain_blocks_left : UINT64_MAX;
		uint32_t homed = self ? self->drain_home_sequences : 0;
		if (r)
			kvmesh__v1__list_nodes_response__free_unpacked(r, NULL);
		int64_t now = agent_mono_ms();
		if (left != last || homed != last_homed) { /* blocks moved, or sequences handed off */
			moved_at = now;
			last = left;
			last_homed = homed;
		}
		const char *why = left == 0 && homed == 0		 ? "drained"
				  : now - t0 >= a->drain_timeout_ms		 ? "timeout"
				  : left && now - moved_at >= DRAIN_STUCK_MS ? "no progress"
									     : NULL;
		struct timespec ts = {0, 200 * 1000000L};
		if (!why && sigtimedwait(sigs, NULL, &ts) > 0)
			why = "second signal";
		if (why) {
			kvm_log(left ? KVM_LOG_WARN : KVM_LOG_INFO, "drain_before_exit",
				"result=\"%s\" blocks_left=%" PRIu64 " home_sequences=%u ms=%" PRId64, why,
				left == UINT64_MAX ? 0 : left, homed, now - t0);
			return;
		}
	}
}

int main(int argc, char **argv)
{
	static agent a;
	/* Tells the coordinator, at registration, that this is a new process:
	 * whatever an earlier one held in memory is gone. */
	if (getrandom(&a.incarnation, sizeof a.incarnation, 0) != sizeof a.incarnation)
		a.incarnation = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
	a.incarnation |= 1; /* never 0 (0: not said) */
	char metrics_listen[KVM_OPT_STRING_MAX];
	char host[256] = "node";
	gethostname(host, sizeof(host) - 1);
	const kvm_option opts[] = {
		{"node-id", KVM_OPT_STRING, a.node_id, host, "this node's id (default: host name)"},
		{"coordinator", KVM_OPT_STRING, a.coordinator, "127.0.0.1:7400",
		 "the coordinator's gRPC address"},
		{"listen", KVM_OPT_STRING, a.listen, "127.0.0.1:7500", "gRPC address to serve on"},
		{"metrics-listen", KVM_OPT_STRING, metrics_listen, "",
		 "HTTP address for /metrics (Prometheus) and /healthz, e.g. :7501 (empty: off)"},
		{"data-address", KVM_OPT_STRING, a.data_address, "127.0.0.1:7600",
		 "data-plane address announced to peers"},
		{"model", KVM_OPT_STRING, a.model_id, "", "id of the model whose KV this agent holds"},
		{"host-pool", KVM_OPT_BYTES, &a.host_pool_bytes, "1GiB",
		 "host memory for KV blocks"},
		{"call-timeout", KVM_OPT_DURATION, &a.call_timeout_ms, "3s",
		 "deadline of calls to the coordinator and to other agents"},
		{"attend-timeout", KVM_OPT_DURATION, &a.attend_timeout_ms, "2s",
		 "deadline of a home agent's ATTEND to the peers holding its blocks"},
		{"tail-reserve", KVM_OPT_INT, &a.tail_reserve_opt, "-1",
		 "slots kept for tails, not offered to the ledger (-1: max(2, slots/16))"},
		{"workers", KVM_OPT_INT, &a.workers_opt, "2",
		 "threads running attention kernels over this node's blocks"},
		{"rdma", KVM_OPT_STRING, a.rdma_opt, "auto",
		 "data plane over RDMA: auto (when this node has an up RDMA port), on (or fail), off"},
		{"rdma-device", KVM_OPT_STRING, a.rdma_device, "",
		 "RDMA device or interface to serve on (default: the one holding --data-address)"},
		{"drain-timeout", KVM_OPT_DURATION, &a.drain_timeout_ms, "30s",
		 "on SIGTERM, wait this long for the blocks other nodes' sequences keep here to move (0: no drain)"},
		{"auth-token-file", KVM_OPT_STRING, a.token_file, "",
		 "file (mode 0600) with the cluster's shared token, presented to the coordinator "
		 "and peers and required by this agent's servers (empty: no authentication)"},
	};
	const size_t n_opts = sizeof(opts) / sizeof(opts[0]);
	char err[512];
	int rc = kvm_config_load(opts, n_opts, &argc, argv, err, sizeof(err));
	if (rc == KVM_CONFIG_HELP) {
		kvm_config_usage(stdout, "kvmesh-agent", "The kvmesh node agent.", opts, n_opts);
		return 0;
	}
	if (rc != 0 || argc > 1 || !a.model_id[0]) {
		fprintf(stderr, "kvmesh-agent: %s\n",
			rc ? err : argc > 1 ? "unexpected argument (see --help)"
					    : "--model is required (the model whose KV it holds)");
		return 2;
	}
	if ((rc = kvm_auth_init("kvmesh-agent", a.token_file, a.token, sizeof(a.token), err,
				sizeof(err))) != 0) {
		fprintf(stderr, "kvmesh-agent: --auth-token-file: %s\n", err);
		return 2;
	}
	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	pthread_mutex_init(&a.mu, NULL);
	pthread_cond_init(&a.cv, NULL);
	pthread_mutex_init(&a.hb_mu, NULL);

	if (kvm_rpc_channel_open(a.coordinator, &a.coord) != 0 ||
	    kvm_rpc_channel_set_token(a.coord, a.token) != 0) {
		fprintf(stderr, "kvmesh-agent: bad --coordinator \"%s\"\n", a.coordinator);
		return 2;
	}
	/* GPUs once: cuInit is not free, and the hardware does not change
	 * while the agent runs. */
	if (gpu_discover(&a.gpus) == 0)
		for (size_t i = 0; i < a.gpus.n; i++) {
			const gpu_info *g = &a.gpus.gpus[i];
			kvm_log(KVM_LOG_INFO, "gpu",
				"index=%u name=\"%s\" memory_bytes=%" PRIu64 " compute=%u.%u pci=%s",
				g->index, g->name, g->memory_bytes, g->cc_major, g->cc_minor,
				g->pci_bus_id[0] ? g->pci_bus_id : "-");
		}
	else
		kvm_log(KVM_LOG_INFO, "no_gpus", "reason=\"%s\"", a.gpus.why_none);
	/* Signals are taken by their own thread, so that one can end the agent
	 * at any stage, waiting for the model included. */
	pthread_t sig_thread;
	struct sig_args sa = {&a, sigs};
	pthread_create(&sig_thread, NULL, signal_main, &sa);

	/* The model's geometry decides the block size, so the pool waits for it. */
	if (fetch_model(&a) != 0) {
		pthread_join(sig_thread, NULL);
		kvm_rpc_channel_close(a.coord);
		return 0; /* stopped by a signal while waiting */
	}

	size_t block_bytes = kvs_geom_block_bytes(&a.geom);
	uint64_t slots = block_bytes ? a.host_pool_bytes / block_bytes : 0;
	if (slots == 0 || slots > UINT32_MAX - 2) {
		kvm_log(KVM_LOG_ERROR, "pool_size", "host_pool=%" PRIu64 " block_bytes=%zu error=\"%s\"",
			a.host_pool_bytes, block_bytes,
			slots == 0 ? "--host-pool holds not one block of this model"
				   : "--host-pool holds too many blocks");
		return 1;
	}
	char aerr[256] = "";
	kvs_arena_opts ao = {.slot_bytes = block_bytes,
			     .n_slots = (uint32_t)slots,
			     .err = aerr,
			     .err_len = sizeof(aerr)};
	if ((rc = kvs_arena_create_host(&ao, &a.arena)) != 0) {
		kvm_log(KVM_LOG_ERROR, "pool_failed", "error=\"%s\"", aerr[0] ? aerr : strerror(-rc));
		return 1;
	}
	kvs_store_config sc = {.geom = a.geom,
			       .model = XXH3_64bits(a.model_id, strlen(a.model_id)),
			       .tiers = {a.arena},
			       .max_seqs = 65536};
	if ((rc = kvs_store_create(&sc, &a.store)) != 0) {
		kvm_log(KVM_LOG_ERROR, "store_failed", "error=\"%s\"", strerror(-rc));
		return 1;
	}
	a.block_bytes = block_bytes;
	a.n_slots = (uint32_t)slots;
	a.tail_reserve = a.tail_reserve_opt >= 0 ? (uint32_t)(a.tail_reserve_opt < (int64_t)slots
								? a.tail_reserve_opt : (int64_t)slots)
						 : (uint32_t)(slots / 16 > 2 ? slots / 16 : 2);
	if (a.tail_reserve > slots)
		a.tail_reserve = (uint32_t)slots;
	unsigned nw = a.workers_opt > 0 && a.workers_opt <= 256 ? (unsigned)a.workers_opt : 2;
	if ((rc = blocks_create(&a)) != 0 || (rc = homeseq_create(&a)) != 0 ||
	    (rc = wpool_create(nw, "kernels", &a.kernels)) != 0 ||
	    (rc = wpool_create(1, "home", &a.home)) != 0 ||
	    (rc = wpool_create(2, "movers", &a.movers)) != 0 ||
	    (rc = wpool_create(2, "handoffs", &a.handoffs)) != 0) {
		kvm_log(KVM_LOG_ERROR, "setup_failed", "error=\"%s\"", strerror(-rc));
		return 1;
	}
	if ((rc = dataplane_start(&a)) != 0)
		return 1;

	kvm_rpc_server *srv;
	kvm_health *health;
	int port;
	if ((rc = kvm_rpc_server_create(a.listen, &port, &srv)) != 0) {
		kvm_log(KVM_LOG_ERROR, "listen_failed", "addr=%s error=\"%s\"", a.listen, strerror(-rc));
		return 1;
	}
	if ((rc = kvm_rpc_server_set_token(srv, a.token)) != 0) {
		kvm_log(KVM_LOG_ERROR, "auth_failed", "error=\"%s\"", strerror(-rc));
		return 1;
	}
	kvm_health_register(srv, &health);
	kvm_rpc_server_add_method(srv, "/kvmesh.v1.Agent/Stats", KVM_RPC_UNARY, agent_stats, &a);
	kvm_rpc_server_add_method(srv, "/kvmesh.v1.Agent/PutBlocks", KVM_RPC_UNARY, blocks_rpc_put, &a);
	kvm_rpc_server_add_method(srv, "/kvmesh.v1.Agent/GetBlocks", KVM_RPC_UNARY, blocks_rpc_get, &a);
	kvm_rpc_server_add_method(srv, "/kvmesh.v1.Agent/AttendAppend", KVM_RPC_UNARY,
				  homeseq_rpc_attend_append, &a);
	kvm_rpc_server_add_method(srv, "/kvmesh.v1.Agent/AdoptSequence", KVM_RPC_UNARY,
				  homeseq_rpc_adopt, &a);
	if ((rc = kvm_rpc_server_start(srv)) != 0) {
		kvm_log(KVM_LOG_ERROR, "start_failed", "error=\"%s\"", strerror(-rc));
		return 1;
	}
	/* /metrics reads the server and the agent's state: the endpoint stops
	 * before either goes, after the drain (which it shows). */
	kvm_metrics_http *http = NULL;
	int metrics_port = 0;
	const kvm_metrics_source src[] = {{kvm_rpc_server_collect, srv}, {agent_collect, &a}};
	if (metrics_listen[0] && kvm_metrics_serve(metrics_listen, src, 2, &metrics_port, &http))
		return 1;
	kvm_health_set(health, "", true);
	kvm_health_set(health, "kvmesh.v1.Agent", true);
	kvm_metrics_http_set_healthy(http, true);
	kvm_log(KVM_LOG_INFO, "serving",
		"node=%s addr=%s data=%s metrics_port=%d model=%s blocks=%" PRIu64
		" tail_reserve=%u block_bytes=%zu auth=%s",
		a.node_id, a.listen, a.data_address, metrics_port, a.model_id, slots, a.tail_reserve,
		block_bytes,
		a.token[0] ? "token" : "none");
	sd_notify(0, "READY=1"); /* Type=notify units start dependants now */

	pthread_mutex_lock(&a.mu);
	bool signalled = a.stopping; /* a signal during startup: no drain */
	a.serving = !signalled;
	pthread_mutex_unlock(&a.mu);
	pthread_t hb;
	pthread_create(&hb, NULL, heartbeat_main, &a);
	pthread_join(sig_thread, NULL); /* returns once a signal said stop */
	kvm_metrics_http_set_healthy(http, false); /* draining: take no new work */
	if (!signalled && a.drain_timeout_ms > 0)
		drain_before_exit(&a, &sigs);
	pthread_mutex_lock(&a.mu);
	a.stopping = true;
	pthread_cond_broadcast(&a.cv);
	pthread_mutex_unlock(&a.mu);
	sd_notify(0, "STOPPING=1");
	kvm_health_set(health, "", false);
	pthread_join(hb, NULL);
	kvm_metrics_http_stop(http);
	kvm_rpc_server_destroy(srv, 2000);
	kvm_health_destroy(health);
	/* Queued kernels finish (their replies still go out), then the data
	 * server closes, then the home sequences' peers. */
	wpool_destroy(a.movers);
	wpool_destroy(a.kernels);
	wpool_destroy(a.home);
	wpool_destroy(a.handoffs); /* after the home pool, which queues its jobs */
	dataplane_stop(&a);
	homeseq_destroy(&a);
	xport_loop_destroy(a.loop);
	dataplane_rdma_free(&a);
	blocks_destroy(&a);
	kvs_store_destroy(a.store);
	kvs_arena_destroy(a.arena);
	kvm_rpc_channel_close(a.coord);
	kvm_log(KVM_LOG_INFO, "stopped", NULL);
	return 0;
}
