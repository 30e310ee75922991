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
#include "kvstore/key.h"
#include "proto/kvmesh.pb-c.h"

#define EVENT_RING 1024
#define NO_NODE UINT32_MAX
/* Commands waiting for one node's next heartbeat; past this, new ones are
 * dropped (a full block report finds the orphans again). */
#define CMD_QUEUE_MAX 4096

/* One block of a MoveBlocks command. */
typedef struct move_item {
	Kvmesh__V1__BlockHandle h;
	char sequence_id[64];
	uint32_t index;
	bool keyed;
	uint8_t key[16];
	char target[KVM_NODE_ID_MAX];
	char target_address[256];
} move_item;

/* A queued command for a node: ReleaseBlocks (handles), ReleaseSequence,
 * MoveBlocks (moves) or HandOff. */
typedef struct cmd_rec {
	struct cmd_rec *next;
	Kvmesh__V1__Command__KindCase kind;
	char *sequence_id; /* ReleaseSequence, HandOff */
	uint64_t data_id;
	char target[KVM_NODE_ID_MAX]; /* HandOff: the new home, its gRPC address, */
	char target_address[256];
	uint64_t home_epoch;          /* and the sequence's home epoch */
	size_t n; /* ReleaseBlocks, MoveBlocks */
	Kvmesh__V1__BlockHandle *handles;
	move_item *moves;
	uint32_t to; /* while staged before queueing (drain.c): the node */
} cmd_rec;

typedef struct soft_seq soft_seq;

/* A keyed full block in the cluster prefix index, shared by `refs`
 * placements (the writer's and those of sequences that share it). Its
 * ledger charge is released once, when refs reach zero. */
typedef struct blk_ent {
	struct blk_ent *next; /* hash chain */
	kvs_key key;
	uint32_t node;         /* holder: index into c->nodes */
	uint32_t refs;
	uint32_t tokens;
	uint32_t mark;         /* holder's report generation that last saw it */
	bool known;            /* handle valid: reported since the last restart/loss */
	bool charged;          /* the ledger holds one block for it, for charge_home */
	bool dropped;          /* scratch, during a full-report sweep */
	uint32_t charge_home;  /* index into c->nodes */
	Kvmesh__V1__BlockHandle h;
	soft_seq *writer;      /* the sequence it was written for, while it lives */
	uint32_t writer_index;
	bool writer_key_stored; /* the writer's durable record carries the key */
	bool moving;           /* a drain is moving it (drain.c) */
} blk_ent;

/* Soft state for one placement of a live sequence. */
typedef struct soft_slot {
	blk_ent *be;     /* set: this placement is that shared block (handle there) */
	uint32_t node;   /* placement's node: index into c->nodes */
	uint32_t mark;   /* report generation that last saw it */
	uint32_t tokens;
	bool known;      /* handle valid (unlinked placements) */
	bool moving;     /* a drain is moving it (drain.c) */
	bool keyed;
	kvs_key key;
	Kvmesh__V1__BlockHandle h;
} soft_slot;

/* In-memory mirror of a live sequence's placements, plus the soft block
 * state that block reports fill in; hashed by data_id. */
struct soft_seq {
	soft_seq *next;
	uint64_t data_id;
	char id[64];
	uint32_t home;
	uint32_t bt;
	uint64_t model; /* XXH3-64 of the model id, as mixed into keys */
	char model_id[64];
	size_t n, cap;
	soft_slot *slots;
	uint64_t handoff_until_ms; /* a HandOff for it is out until then (drain.c) */
	bool degraded;             /* not served any more: a drain does not hand it off */
	uint64_t home_epoch;       /* as in its record (1 at creation) */
	/* As stored: its tokens, the blocks in its whole record "seqs/ID" and
	 * the extension records after it (sequences.c). */
	uint64_t tokens;
	uint32_t shared_prefix;
	uint32_t stored_blocks, ext_records;
};

/* A block in flight off a draining node (drain.c): reserved on dst for
 * home; done when dst reports it, given up at deadline. */
typedef struct move_rec {
	uint64_t data_id; /* the sequence it moves under (private placements) */
	uint32_t index;
	bool shared;      /* a prefix-index block, found by key */
	kvs_key key;
	uint32_t src, dst, home; /* node indexes */
	bool release_src; /* the ledger charges the block to src until it lands */
	uint64_t deadline_ms;
} move_rec;

typedef struct node_rec {
	char id[KVM_NODE_ID_MAX];
	char model[KVM_MODEL_ID_MAX]; /* the model it serves ("": unknown) */
	uint8_t *reg; /* packed Kvmesh__V1__Node as registered */
	size_t reg_len;
	uint64_t epoch;
	Kvmesh__V1__NodeState state;
	uint64_t incarnation;       /* its agent process's (Node.incarnation) */
	uint64_t restarts;          /* new incarnations seen before it was dead */
	uint64_t last_heartbeat_ms; /* wall clock, for people */
	uint64_t heard_ms;          /* coord_mono_ms(), for liveness (stalls forgiven) */
	double load;
	Kvmesh__V1__TierCapacity cap[2]; /* gpu, host */
	bool drain_pending;              /* a Drain command to send */
	bool drained_told;               /* the "drained" event went out */
	bool handoff_stalled_told;       /* "no node takes its sequences" was logged */
	Kvmesh__V1__NodeState admin;     /* CORDONED or DRAINING as an operator set it
					    (durable: "admin/ID"), else READY */
	cmd_rec *cmd_head, *cmd_tail;    /* FIFO for the next heartbeat */
	size_t n_cmds;
	uint64_t cmds_dropped;           /* while the queue was full */
	uint32_t report_gen;             /* bumped when a full report begins */
	bool full_open;                  /* a full report is in progress */
	bool reported;                   /* a full report ended since it registered:
					    its handles are known */
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

	/* Soft state (blocks.c): live sequences by data_id, the prefix index by key. */
	soft_seq **seqs;
	size_t seq_buckets, n_seqs;
	blk_ent **blks;
	size_t blk_buckets, n_blks;

	uint64_t degraded_total; /* sequences marked degraded since start */
	uint64_t stalls;         /* times the coordinator found itself stalled */

	/* Blocks moving off draining nodes (drain.c). */
	move_rec *moves;
	size_t n_moves, cap_moves;

	/* Calls waiting for their change to be durable (commit.c). */
	pthread_mutex_t commit_mu;
	pthread_cond_t commit_cv;
	struct commit_rec *commit_head, *commit_tail;
	bool commit_stop, committer_running;
	bool store_failed_told; /* the fail-stop was logged and asked for (commit_mu) */
	pthread_t committer;
};

uint64_t coord_now_ms(void);  /* wall clock: timestamps */
uint64_t coord_mono_ms(void); /* monotonic: ages and deadlines */
/* "ready", "cordoned", "draining", "dead" ("unknown" otherwise). */
const char *coord_state_name(Kvmesh__V1__NodeState s);
/* Packs m and sets it as the unary reply; returns the status to return. */
int coord_reply(kvm_rpc_call *call, const ProtobufCMessage *m);
/* 1-63 characters of [A-Za-z0-9._-]. */
bool coord_valid_id(const char *s);
/* With mu held. */
node_rec *coord_find_node(kvm_coord *c, const char *id);
/* Appends a packed event (seq and time filled in here) to the ring, waking
 * watchers; mu held. */
void coord_emit(kvm_coord *c, Kvmesh__V1__Event *ev);
/* A node event with the node's current state (and a log line); mu held. */
void coord_node_event(kvm_coord *c, uint32_t node, const char *reason);

/* sequences.c: the sequence calls, recovery of the ledger's reservations
 * from stored sequences at start, and marking sequences degraded when a node
 * dies (mu held). */
int coord_create_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int coord_extend_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int coord_get_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int coord_list_sequences(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int coord_release_sequence(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int coord_move_sequence_home(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int coord_recover_sequences(kvm_coord *c);
/* A node's memory is gone (it died, or its agent restarted: how says which):
 * the sequences whose written blocks were there, or that were homed there
 * (their tail, the tokens after the last full block, lived only on the
 * home), are degraded. */
void coord_node_lost(kvm_coord *c, const char *node_id, const char *how);
/* Marks a stored sequence degraded (durable with the next sync) and emits the
 * event; mu held. */
void coord_degrade(kvm_coord *c, const char *id, const uint32_t *lost, size_t n, const char *why);

/* blocks.c: the soft block index, prefix index and node commands; all with
 * mu held unless said otherwise. */
int coord_report_blocks(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
int coord_match_prefix(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len);
uint64_t coord_data_id(const char *id);
uint64_t coord_model_hash(const char *model_id);
uint32_t coord_node_ix(kvm_coord *c, const char *id);
soft_seq *coord_soft_find(kvm_coord *c, const char *id);
soft_seq *coord_soft_find_data(kvm_coord *c, uint64_t data_id);
/* A new entry for a live sequence (no slots); NULL when out of memory. */
soft_seq *coord_soft_add(kvm_coord *c, const char *id, const char *home, const char *model_id,
			 uint32_t bt);
/* Appends a placement on `node`; -ENOMEM. */
int coord_soft_push(kvm_coord *c, soft_seq *ss, const char *node);
/* Unlinks and frees; the caller has dealt with refs. */
void coord_soft_remove(kvm_coord *c, soft_seq *ss);
blk_ent *coord_blk_find(kvm_coord *c, kvs_key key);
blk_ent *coord_blk_add(kvm_coord *c, kvs_key key, uint32_t node);
void coord_blk_remove(kvm_coord *c, blk_ent *be);
/* The leading run of full blocks of tokens found in the prefix index with a
 * live handle: fills out[0..k) and returns k (at most cap). */
uint32_t coord_match_run(kvm_coord *c, uint64_t model, uint32_t bt, const uint32_t *tokens,
			 size_t n, blk_ent **out, uint32_t cap);
int coord_key_from(const ProtobufCBinaryData *b, kvs_key *out);
/* Takes ownership of cmd: queues it for node ix (freed if dropped). */
void coord_queue_cmd(kvm_coord *c, uint32_t node, cmd_rec *cmd);
void coord_cmd_free(cmd_rec *cmd);
/* Drops a dead node's handles and queued commands. */
void coord_soft_node_lost(kvm_coord *c, uint32_t node);
void coord_soft_destroy(kvm_coord *c);

/* commit.c: the committer thread (started before the server takes calls,
 * stopped after it stopped: it finishes what is queued first). */
int coord_commit_start(kvm_coord *c);
void coord_commit_stop(kvm_coord *c);
/* For a handler that appended to the store with *_async (ticket: the last
 * record's): returns rc as it is when rc is not OK or ticket is 0; else queues
 * the call to be finished once the store is durable up to ticket (OK with the
 * reply already set, or UNAVAILABLE) and returns KVM_RPC_DEFERRED. The handler
 * must not touch `call` after that. */
int coord_reply_when_durable(kvm_coord *c, kvm_rpc_call *call, int rc, uint64_t ticket);
/* Fails call for the store's error src: RESOURCE_EXHAUSTED when its disk is
 * full (nothing was changed), else UNAVAILABLE. A failed write or sync
 * sticks (what is durable is unknown): the coordinator then stops, once,
 * with SIGTERM to itself, and main exits 74 for the supervisor to restart it
 * from the disk. Returns the status to return. */
int coord_store_fail(kvm_coord *c, kvm_rpc_call *call, int src);

/* drain.c: moving blocks off draining nodes; all with mu held. */
/* Gives up expired moves, then plans more for `node` if it is draining. */
void coord_drain_step(kvm_coord *c, uint32_t node);
/* Placements that moves completed by one report switched to its node: the
 * sequences' durable records are written once per sequence at the end
 * (coord_moved_flush), not once per block (a record names every block). */
typedef struct moved_list {
	size_t n, cap;
	struct moved_ent {
		soft_seq *s;
		uint32_t index;
	} *e;
} moved_list;
/* A report from `node` of placement (s, index) that the index puts on
 * another node: when it completes a move, switches the placement in soft
 * state, adds the records to rewrite to *moved, appends the old copy's
 * release to *staged (queue it once *ticket, raised by coord_moved_flush, is
 * durable) and returns true. */
bool coord_move_done(kvm_coord *c, uint32_t node, soft_seq *s, uint32_t index,
		     const Kvmesh__V1__BlockReport *b, moved_list *moved, uint64_t *ticket,
		     cmd_rec **staged);
/* Writes the records of *moved (placements now on `node`), one per
 * sequence, raising *ticket; empties *moved. Before mu is released. */
void coord_moved_flush(kvm_coord *c, uint32_t node, moved_list *moved, uint64_t *ticket);
/* A sequence left: its private moves end (a late report is an orphan, even
 * if a new sequence takes the same id). */
void coord_moves_seq_gone(kvm_coord *c, uint64_t data_id);
/* A node died: moves from or to it end. */
void coord_moves_node_lost(kvm_coord *c, uint32_t node);
/* For a draining node: blocks still to move, sequences homed there. */
void coord_drain_progress(kvm_coord *c, uint32_t node, uint64_t *blocks_left, uint32_t *home_seqs);
void coord_moves_destroy(kvm_coord *c);

/* sequences.c: records that placements index[0..n) (ascending) of sequence
 * id now live on `node` (durable once *ticket is synced): one record
 * write. */
int coord_seq_set_nodes(kvm_coord *c, const char *id, const uint32_t *index, size_t n,
			const char *node, uint64_t *ticket);

#endif
