/* Internal to kvmesh-agent: the agent's state and the seams between its files.
 *
 *   agent.c    main, registration, heartbeats and their commands, Stats
 *   gpus.c     GPU discovery through the CUDA driver, loaded at run time (gpus.h)
 *   workers.c  worker pools (kernels run there, never on the xport loop)
 *   blocks.c   pinned blocks: PutBlocks/GetBlocks, block reports, the data
 *              server's GET and ATTEND over block handles
 *   homeseq.c  home sequences: tails, APPEND_KV, fan-out ATTEND, sealing,
 *              AttendAppend
 *
 * Threads: the gRPC pool runs Agent.* handlers; the heartbeat thread
 * registers, heartbeats and applies commands; the xport loop thread runs the
 * data server's handlers (quick ones only); the kernel pool runs ATTEND over
 * block handles (never waits on anything); the home pool (one thread) runs
 * everything of home sequences that may wait: fan-out attends, seals, the
 * drop of a released sequence. It owns the data-plane connections to peers,
 * so no other thread submits to or closes them. */
#ifndef KVMESH_NODE_AGENT_AGENT_H
#define KVMESH_NODE_AGENT_AGENT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/auth.h"
#include "common/config.h"
#include "common/metrics.h"
#include "common/rpc.h"
#include "kernels/distattn.h"
#include "kvstore/arena.h"
#include "kvstore/store.h"
#include "node-agent/gpus.h"
#include "proto/kvmesh.pb-c.h"
#include "transport/nic.h"
#include "transport/rdma.h"
#include "transport/transport.h"

/* ---- worker pools (workers.c) ----------------------------------------------- */

typedef struct wpool wpool;
/* A job gets its worker's own kernel context. */
typedef void (*wjob_fn)(void *arg, da_ctx *ctx);
/* n threads, each with a one-thread da_ctx. */
int wpool_create(unsigned n, const char *name, wpool **out);
/* Queues fn(arg): 0, -ECANCELED once the pool stops, -ENOMEM. */
int wpool_submit(wpool *p, wjob_fn fn, void *arg);
/* Runs what is queued, then joins and frees. */
void wpool_destroy(wpool *p);

/* ---- the agent ----------------------------------------------------------------- */

typedef struct blocks blocks;   /* blocks.c */
typedef struct homeseqs homeseqs; /* homeseq.c */

typedef struct agent {
	char node_id[KVM_OPT_STRING_MAX], coordinator[KVM_OPT_STRING_MAX];
	char listen[KVM_OPT_STRING_MAX], data_address[KVM_OPT_STRING_MAX];
	char model_id[KVM_OPT_STRING_MAX];
	uint64_t host_pool_bytes;
	int64_t call_timeout_ms, attend_timeout_ms;
	int64_t tail_reserve_opt; /* -1: max(2, slots / 16) */
	int64_t workers_opt;
	char rdma_opt[KVM_OPT_STRING_MAX];    /* --rdma: auto, on, off */
	char rdma_device[KVM_OPT_STRING_MAX]; /* --rdma-device: "" picks one */
	char token_file[KVM_OPT_STRING_MAX];  /* --auth-token-file */
	/* The cluster's token ("": none): presented to the coordinator, to
	 * peers' gRPC and data servers, and required by this agent's servers. */
	char token[KVM_AUTH_TOKEN_MAX + 1];

	kvm_rpc_channel *coord;
	kvs_geom geom;
	uint32_t q_heads;
	size_t block_bytes;
	uint32_t n_slots, tail_reserve;
	kvs_arena *arena;
	kvs_store *store;
	xport_loop *loop;
	xport_server *data_srv;
	wpool *kernels, *home, *movers, *handoffs;
	blocks *blk;
	homeseqs *hs;

	/* The data plane's transport (dataplane_start). With RDMA the server
	 * serves the host arena, registered whole (srv_mr), and the home pool
	 * dials peers with its own device handle and a small region (cli_*):
	 * ATTEND goes by SEND/RECV and needs no block buffers. */
	nic_report nics;              /* this node's, discovered at start */
	gpu_report gpus;              /* this node's, discovered once at start */
	bool data_rdma;               /* the data server is xport_rdma_listen */
	struct xrdma_dev *rdma_srv_dev, *rdma_cli_dev;
	struct xrdma_mr *rdma_srv_mr, *rdma_cli_mr;
	void *rdma_cli_buf;
	uint32_t rdma_peers;          /* peers connected by RDMA now (atomic) */
	uint64_t rdma_fallbacks;      /* RDMA dials that fell back to TCP (atomic) */
	/* Home attention batches (data plane and gRPC), for /metrics: their
	 * time from the job's start to the merged result, and queries that
	 * ran and that failed (atomic). */
	kvm_histogram attend_latency;
	uint64_t attend_queries, attend_failed;
	uint64_t hand_offs, hand_off_failures, adoptions; /* drains (atomic) */
	uint64_t incarnation; /* random per process start (Node.incarnation) */

	pthread_mutex_t mu; /* guards epoch, registered, stopping */
	pthread_cond_t cv;
	uint64_t epoch;
	uint32_t heartbeat_ms;
	bool registered;
	bool stopping;
	bool serving;              /* past startup: a signal drains first */
	int64_t drain_timeout_ms;  /* --drain-timeout */
	pthread_mutex_t hb_mu; /* one heartbeat at a time (thread or ENOSPC retry) */
	bool report_unimplemented_logged;
} agent;

/* Calls a coordinator method: returns the gRPC status code (UNAVAILABLE when
 * the call could not be made); *resp is malloc'd on success. */
int agent_coord_call(agent *a, const char *method, const ProtobufCMessage *req, void **resp,
		     size_t *len, char *msg, size_t msg_len);
/* The same to another agent's Agent service at target (host:port). */
int agent_peer_call(agent *a, kvm_rpc_channel *ch, const char *method, const ProtobufCMessage *req,
		    void **resp, size_t *len, char *msg, size_t msg_len);
/* The same with a deadline of its own. */
int agent_peer_call_ms(kvm_rpc_channel *ch, const char *method, const ProtobufCMessage *req,
		       int64_t timeout_ms, void **resp, size_t *len, char *msg, size_t msg_len);
/* Heartbeats now and applies the commands that come back (a PutBlocks that
 * ran out of slots fetches pending releases this way). */
void agent_heartbeat_now(agent *a);
/* CLOCK_MONOTONIC in milliseconds. */
int64_t agent_mono_ms(void);
uint64_t agent_epoch(agent *a);

/* ---- pinned blocks (blocks.c) -------------------------------------------------- */

int blocks_create(agent *a);
void blocks_destroy(agent *a);
/* Stores and pins one full block written for sequence seq_id at index;
 * key NULL: unkeyed. *h gets its arena handle. No report. */
int blocks_store(agent *a, const char *seq_id, uint32_t index, const kvs_key *key,
		 const void *bytes, kvs_handle *h);
/* Reports blocks (by handle) to the coordinator, incrementally. Returns the
 * gRPC code; UNIMPLEMENTED (an older coordinator) is logged and taken as OK. */
int blocks_report(agent *a, const kvs_handle *hs, uint32_t n, char *msg, size_t msg_len);
/* The full report after a (re)registration, in chunks. */
int blocks_report_all(agent *a);
/* Drops one pin of the block at handle h (a ReleaseBlocks command). */
int blocks_release(agent *a, kvs_handle h);
/* Reads a pinned block: *ptr stays valid until blocks_unread(a, *pin).
 * -ESTALE (generation), -ENOENT (not a pinned block here). */
int blocks_read(agent *a, const wire_handle *h, const void **ptr, void **pin);
void blocks_unread(agent *a, void *pin);
/* A MoveBlocks command (a drain): copies each block to its target with the
 * target's Agent.PutBlocks, on the movers pool; the copy here stays until
 * the coordinator releases it. */
int blocks_move(agent *a, const Kvmesh__V1__Command__MoveBlocks *m);
/* gRPC Agent.PutBlocks, Agent.GetBlocks. */
int blocks_rpc_put(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int blocks_rpc_get(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
/* Starts the data server on --data-address: over RDMA (xport_rdma_listen, the
 * host arena registered as arena WIRE_ARENA_HOST) when --rdma allows it and
 * this node has an up RDMA port, else TCP. Logs data_server transport=... */
int dataplane_start(agent *a);
/* Closes the data server (before homeseq_destroy). */
void dataplane_stop(agent *a);
/* Frees the RDMA device handles and regions (after the peers and the loop). */
void dataplane_rdma_free(agent *a);
/* A wire shape checked against this agent's model. -EINVAL. */
int agent_shape(agent *a, const wire_shape *w, da_shape *out);
/* Pins held, for Stats. */
uint32_t blocks_pinned(agent *a);

/* ---- home sequences (homeseq.c) ------------------------------------------------ */

int homeseq_create(agent *a);
void homeseq_destroy(agent *a); /* after the home pool stopped */
/* APPEND_KV entry on a sequence handle (loop thread). */
int homeseq_append_wire(agent *a, const wire_append_ref *ref, const void *k, const void *v);
/* ATTEND batch with sequence handles: defers to the home pool. */
int homeseq_attend_wire(agent *a, const wire_attend_view *v, const float *q, float *o, float *lse,
			int *st, xport_attend_token *tok);
/* A ReleaseSequence command (heartbeat thread): queued on the home pool. */
void homeseq_release(agent *a, const char *seq_id, uint64_t data_id);
/* A drain's HandOff: the sequence goes to target (gRPC target_addr), on the
 * home pool after what is queued. */
void homeseq_hand_off(agent *a, const char *seq_id, uint64_t data_id, const char *target,
		      const char *target_addr, uint64_t home_epoch);
/* Drops the sequences handed off more than a grace period ago (their
 * in-flight attends are done); from the heartbeat thread. */
void homeseq_expire(agent *a);
/* Agent.AdoptSequence: become the sequence's home (from a draining one). */
int homeseq_rpc_adopt(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int homeseq_rpc_attend_append(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
uint32_t homeseq_count(agent *a);
/* After a registration again: each home sequence is checked with the
 * coordinator (degraded meanwhile?) before it is served again. */
void homeseq_recheck_all(agent *a);

/* XXH3-64 of a sequence id: its name on the data plane. */
uint64_t agent_data_id(const char *seq_id);

#define WIRE_ARENA_HOST 0 /* the host arena's handles on the wire */

#endif
