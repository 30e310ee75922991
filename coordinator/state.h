/* The coordinator's durable state: membership, models, sequences and
 * placements, as key → value records (values are protobuf bytes). Behind
 * one interface with two backends: the embedded store (the default, for one
 * machine: an fsync'd append-only log with periodic snapshots under a data
 * directory) and etcd (when configured). The block index is soft state and
 * never stored here: it is rebuilt from the agents' block reports.
 *
 * Keys are printable strings such as "nodes/n1" or "seqs/s42"; a scan visits
 * every key with a prefix, in key order. All functions return 0 or a negative
 * errno code; a store is safe to use from several threads. */
#ifndef KVMESH_COORDINATOR_STATE_H
#define KVMESH_COORDINATOR_STATE_H

#include <stddef.h>
#include <stdint.h>

#define KVM_STATE_MAX_KEY 1024
#define KVM_STATE_MAX_VALUE (16u << 20)

typedef struct kvm_state kvm_state;

/* Called for each record of a scan; a non-zero return stops the scan and is
 * returned by it. key and value are valid only during the call. */
typedef int (*kvm_state_visit)(void *arg, const char *key, const void *val, size_t len);

typedef struct kvm_state_stats {
	uint64_t records;       /* live keys */
	uint64_t log_bytes;     /* bytes in the log since the last snapshot */
	uint64_t snapshots;     /* snapshots written since open */
	uint64_t recovered;     /* records replayed at open (snapshot + log) */
	uint64_t torn_bytes;    /* bytes cut from the log's end at open (a torn write) */
	uint64_t syncs;         /* fdatasync calls (each may cover many records) */
	uint64_t appends;       /* records appended since open (appends / syncs: the batch) */
	uint64_t refused;       /* appends refused: no room left for the log to grow */
	uint64_t snapshot_failures;
	uint64_t room_bytes;    /* preallocated room left in the log for new records */
	int room_error;         /* 0, or why the log cannot grow (-ENOSPC, -EDQUOT, -EFBIG) */
	int sync_error;         /* 0, or the write or sync error that stuck (see below) */
} kvm_state_stats;

/* Opens (creating if needed) an embedded store in dir. Refuses with -EBUSY a
 * directory another process has open. Records come back from the last
 * snapshot plus the log after it. The log ends at its first incomplete or
 * corrupt record (a crash mid-write): the rest is cut off and counted in
 * torn_bytes, since nothing after it was ever acknowledged. A snapshot that
 * does not read back whole is -EIO (it is written atomically, so that is
 * damage, not a crash).
 * snapshot_bytes: write a snapshot once the log grows past this (0: 64 MiB).
 * *out is owned by the caller: kvm_state_close. */
int kvm_state_open_embedded(const char *dir, uint64_t snapshot_bytes, kvm_state **out);

/* Durable once they return (the log is fsync'd).
 *
 * A full disk: once the log cannot grow (its preallocation failed with
 * -ENOSPC, -EDQUOT or -EFBIG), a change is refused with that error, before it
 * changes anything, when it would not fit in the room already written: an
 * ordinary put (new state for a client) while less than 1 MiB is left; a
 * delete or an upkeep put (the owner's own bookkeeping) only when it does
 * not fit at all. The log grows again, at most a second after space returns.
 *
 * A write or fdatasync that fails after records were applied sticks: from
 * then on what is durable is unknown (the kernel may have dropped the dirty
 * pages), and every later sync returns that error (kvm_state_failed). The
 * owner stops and opens the store again, which recovers what is on disk. */
int kvm_state_put(kvm_state *st, const char *key, const void *val, size_t len);
int kvm_state_upkeep(kvm_state *st, const char *key, const void *val, size_t len);
int kvm_state_del(kvm_state *st, const char *key); /* -ENOENT if absent */
int kvm_state_failed(kvm_state *st); /* 0, or the sticky error */

/* Group commit, for callers that serialise their own updates and must not
 * hold their lock through an fsync: the _async calls append the record and
 * apply it (later reads see it) and return a ticket; kvm_state_sync(ticket)
 * returns once the log is durable up to it. One fdatasync covers every
 * record appended by then, from any thread, so concurrent writers share it.
 * Acknowledge a change to a client only after its sync returned 0. */
int kvm_state_put_async(kvm_state *st, const char *key, const void *val, size_t len,
			uint64_t *ticket);
int kvm_state_upkeep_async(kvm_state *st, const char *key, const void *val, size_t len,
			   uint64_t *ticket);
int kvm_state_del_async(kvm_state *st, const char *key, uint64_t *ticket);
int kvm_state_sync(kvm_state *st, uint64_t ticket);
/* How long a sync has been taking (a moving average, ns; 1 ms until the
 * first syncs are measured), so that callers can choose where to wait. */
uint64_t kvm_state_sync_ns(kvm_state *st);

/* *val is malloc'd (caller frees); -ENOENT if absent. */
int kvm_state_get(kvm_state *st, const char *key, void **val, size_t *len);
int kvm_state_scan(kvm_state *st, const char *prefix, kvm_state_visit fn, void *arg);

/* Writes a snapshot now (after one in the background ends) and returns its
 * result; changes go on meanwhile. Others start by themselves once the log
 * grows past snapshot_bytes, and are written by a thread of the store's. */
int kvm_state_snapshot(kvm_state *st);
void kvm_state_stats_get(kvm_state *st, kvm_state_stats *out);
void kvm_state_close(kvm_state *st);

#endif
