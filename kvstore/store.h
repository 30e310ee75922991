/* The block store of one node: KV blocks in up to two tiers of arenas (a fast
 * one, normally GPU memory, and a slower one, normally host memory), the
 * sequence table, the prefix index, eviction and tiering, and accounting.
 *
 * Blocks. A sequence writes its newest tokens into a private, mutable tail
 * block. When the tail is full it is sealed: keyed by kvs_key_chain(), its
 * bytes checksummed (XXH3-64), and entered into the prefix index, or, when an
 * identical key is already stored, dropped in favour of that block
 * (deduplication). Full blocks are immutable and reference-counted by the
 * sequences that list them. A full block that no sequence lists stays cached
 * and evictable, least recently used first. When the fast tier needs room,
 * its coldest unreferenced blocks move to the slow tier rather than being
 * dropped, and move back when a sequence takes them again. The checksum is
 * verified on demand and on every tier move; a block that fails is never
 * handed out again.
 *
 * Handles. A block is named by a kvs_block_id (record, generation): stable
 * across tier moves, refused with -ESTALE once the block is evicted. Its
 * bytes live at an arena slot (kvs_handle) that changes when it moves.
 *
 * Pointers. The store moves or frees a block's slot only when no sequence
 * lists it, or when the owner asks (kvs_block_move, kvs_seq_release): so a
 * pointer from kvs_seq_blocks() stays valid while its sequence lists the
 * block and the owner does not move it. A reader that cannot rule a move out
 * validates after reading with kvs_arena_check(arena, slot).
 *
 * Threads. Every function may be called from any thread; one mutex per
 * store serialises them (memcached's habit: public functions lock, static
 * do_* helpers assume the lock), except kvs_store_match and _match_keys,
 * which read the prefix index lock-free (a seqlock) and take the lock only
 * when writers keep interfering. Writing a tail's K/V bytes through its
 * pointer is the caller's business and needs no lock.
 *
 * Errors are 0 or a negative errno: -EINVAL (bad argument), -ENOENT (no such
 * sequence or key), -EEXIST, -ESTALE (stale block id), -EBUSY (operation
 * needs a sealed or empty tail), -ENOSPC (every slot of every tier holds a
 * tail or a referenced block; also logged, with the counts, as one line),
 * -EIO (a checksum mismatch or a failed device copy), -ENOMEM. */
#ifndef KVMESH_KVSTORE_STORE_H
#define KVMESH_KVSTORE_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "kvstore/arena.h"
#include "kvstore/geom.h"
#include "kvstore/key.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_MAX_TIERS 2
#define KVS_TIER_FAST 0 /* GPU memory on a GPU node */
#define KVS_TIER_SLOW 1 /* host memory */

/* (generation << 32) | record; 0 is never a valid id. */
typedef uint64_t kvs_block_id;
#define KVS_BLOCK_NONE ((kvs_block_id)0)

/* Sequence ids are the caller's (the coordinator's request ids). */
typedef uint64_t kvs_seq_id;

/* The node id of entries held by this node. */
#define KVS_NODE_LOCAL UINT32_MAX

typedef struct kvs_store kvs_store;

typedef struct kvs_store_config {
	kvs_geom geom;    /* every arena's slot_bytes must be its block bytes */
	uint64_t model;   /* model id, mixed into every block key */
	kvs_arena *tiers[KVS_MAX_TIERS]; /* borrowed; tiers[0] required, [1]
					    optional. The store must be the only
					    user of its arenas, which must
					    outlive it. */
	uint32_t max_seqs; /* capacity of the sequence table, > 0 */
	/* Where event lines (logfmt) go; NULL: stderr. Called with the store
	 * lock held: it must not call back into the store. */
	void (*log)(void *arg, const char *line);
	void *log_arg;
} kvs_store_config;

/* Creates a store. *out is owned by the caller: kvs_store_destroy. */
int kvs_store_create(const kvs_store_config *cfg, kvs_store **out);

/* Releases every sequence and block (their slots go back to the arenas) and
 * frees the store. The arenas stay the caller's. NULL is a no-op. */
void kvs_store_destroy(kvs_store *s);

/* ---- sequences ------------------------------------------------------------ */

/* Creates an empty sequence. -EEXIST, -ENOSPC when the table is full. */
int kvs_seq_create(kvs_store *s, kvs_seq_id id);

/* Drops a sequence: its full blocks lose a reference (and stay cached), its
 * tail is freed. -ENOENT. */
int kvs_seq_release(kvs_store *s, kvs_seq_id id);

/* Extends a sequence that ends on a block boundary (no tail) with the
 * longest run of stored full blocks matching tokens[0..n) (only whole blocks
 * count), sharing them. *n_matched gets the tokens covered, a multiple of
 * block_tokens. -EBUSY if the sequence has a tail; -ENOMEM if its block list
 * could not grow (*n_matched still says what was attached). */
int kvs_seq_attach_prefix(kvs_store *s, kvs_seq_id id, const uint32_t *tokens, uint32_t n,
			  uint32_t *n_matched);

/* Where the caller writes the K/V of tokens just appended. */
typedef struct kvs_tail_view {
	kvs_block_id block; /* the tail block */
	unsigned tier;
	kvs_handle slot;     /* in the tier's arena */
	void *ptr;           /* block base (device pointer on a GPU tier) */
	uint32_t first;      /* block-relative index of the first token taken */
	uint32_t n_taken;    /* tokens taken (<= n): the tail had room for these */
} kvs_tail_view;

/* Appends up to n (> 0) token ids to the sequence's tail, allocating a tail
 * when there is none (in the fastest tier that has or can make room, which
 * the view names), and says where their K/V go. A tail that is already
 * full is sealed first (its bytes must be complete by then). Call again for
 * the tokens not taken. -ENOSPC when no slot can be found (nothing taken). */
int kvs_seq_append(kvs_store *s, kvs_seq_id id, const uint32_t *tokens, uint32_t n,
		   kvs_tail_view *out);

/* Seals a full tail (see above). -EINVAL if there is no full tail. */
int kvs_seq_seal(kvs_store *s, kvs_seq_id id);

/* Records a full block held by another node (node, its kvs_block_id there,
 * and its key, which continues this sequence's key chain). Nothing is
 * fetched. -EBUSY if the sequence has a tail. */
int kvs_seq_append_remote(kvs_store *s, kvs_seq_id id, uint32_t node, uint64_t remote_block,
			  kvs_key key);

/* One entry of a sequence's block list. */
typedef struct kvs_block_ref {
	kvs_block_id block; /* local blocks; KVS_BLOCK_NONE for remote ones */
	uint32_t node;      /* KVS_NODE_LOCAL, or the holder's node id */
	uint64_t remote;    /* the holder's block id (remote entries) */
	unsigned tier;      /* local blocks: */
	kvs_handle slot;
	void *ptr;
	kvs_key key;        /* zero for the tail and remote entries */
	uint32_t refs;      /* sequences listing it (1 for a tail), plus pins */
	int sealed;         /* 0 only for the tail */
} kvs_block_ref;

typedef struct kvs_seq_info {
	uint64_t n_tokens;
	uint32_t n_blocks;  /* entries, including the tail if any */
	uint32_t tail_fill; /* tokens in the tail (0: no tail) */
	kvs_key last_key;   /* key of the last full entry (KVS_KEY_ROOT if none) */
} kvs_seq_info;

int kvs_seq_get_info(kvs_store *s, kvs_seq_id id, kvs_seq_info *out);

/* Copies entries [first, first + cap) of the block list (the tail last) to
 * out (caller-owned) and their count to *n_out. -ENOENT. */
int kvs_seq_blocks(kvs_store *s, kvs_seq_id id, uint32_t first, kvs_block_ref *out, uint32_t cap,
		   uint32_t *n_out);

/* ---- blocks --------------------------------------------------------------- */

/* Describes one local block. -ESTALE. */
int kvs_block_get(kvs_store *s, kvs_block_id b, kvs_block_ref *out);

/* Checks a full block's bytes against its checksum. -EIO on a mismatch (the
 * block is then evicted if unreferenced), -ESTALE, -EBUSY for a tail. */
int kvs_block_verify(kvs_store *s, kvs_block_id b);

/* Moves a full block to another tier (checksum verified before and after;
 * may evict or demote unreferenced blocks there). Its slot handle and
 * pointer change; readers must not hold them. -ENOSPC, -EIO, -ESTALE,
 * -EBUSY for a tail, -EINVAL for a missing tier. */
int kvs_block_move(kvs_store *s, kvs_block_id b, unsigned tier);

/* Stores one full block of a cluster sequence (PutBlocks, or a sealed tail
 * of a home sequence) and pins it: it is never moved to make room nor
 * evicted while pinned, and pins count as references in the statistics and
 * in kvs_store_check. bytes (block_bytes of them, host memory, caller's) are
 * copied into a slot of the fastest tier with room (unreferenced cached
 * blocks may be demoted or evicted for it) and checksummed. A keyed block
 * enters the prefix index; if an equal key is already stored, that block is
 * pinned instead and nothing is copied (deduplication). key NULL: an
 * unkeyed block (written by decode), never indexed or shared. *out
 * describes the pinned block. -ENOSPC, -EIO, -EINVAL. */
int kvs_block_put(kvs_store *s, const kvs_key *key, const void *bytes, kvs_block_ref *out);

/* Drops one pin of kvs_block_put. A keyed block with no references left
 * stays cached and evictable; an unkeyed one is freed. -ESTALE, -EINVAL if
 * the block holds no pin. */
int kvs_block_unpin(kvs_store *s, kvs_block_id b);

/* ---- prefix index --------------------------------------------------------- */

/* How many leading full blocks of tokens[0..n), hashed from the root, are
 * stored. Takes no reference and moves nothing (for routing decisions).
 * Keys are compared in 96 of their 128 bits here (one cache miss per block
 * instead of two); everything that hands out a block compares all 128. */
int kvs_store_match(kvs_store *s, const uint32_t *tokens, uint32_t n, uint32_t *n_blocks);

/* The same over a precomputed key chain keys[0..n). */
int kvs_store_match_keys(kvs_store *s, const kvs_key *keys, uint32_t n, uint32_t *n_blocks);

/* The stored full block with this key. -ENOENT. */
int kvs_store_lookup(kvs_store *s, kvs_key key, kvs_block_id *out);

/* ---- eviction ------------------------------------------------------------- */

/* Drops up to n unreferenced blocks of a tier, least recently used first;
 * *n_evicted (optional) gets how many. */
int kvs_store_evict(kvs_store *s, unsigned tier, uint32_t n, uint32_t *n_evicted);

/* ---- accounting ----------------------------------------------------------- */

typedef struct kvs_tier_stats {
	uint32_t capacity;   /* slots */
	uint32_t used;       /* slots held by blocks (tails + full) */
	uint32_t free;       /* capacity - used */
	uint32_t evictable;  /* full blocks no sequence lists */
	uint32_t tails;      /* private tail blocks */
	uint32_t referenced; /* full blocks some sequence lists */
} kvs_tier_stats;

typedef struct kvs_store_stats {
	unsigned n_tiers;
	kvs_tier_stats tier[KVS_MAX_TIERS];
	uint32_t n_seqs;
	uint32_t n_indexed;   /* full blocks in the prefix index */
	uint64_t hits;        /* prefix-index probes that found a block */
	uint64_t misses;      /* probes that did not */
	uint64_t seals;
	uint64_t dedups;      /* seals that found the key stored already */
	uint64_t evictions;   /* blocks dropped */
	uint64_t demotions;   /* fast -> slow moves to make room */
	uint64_t promotions;  /* slow -> fast moves on use */
	uint64_t moves;       /* every tier move, including the above */
	uint64_t csum_failures;
	uint64_t enospc;      /* requests refused for lack of space */
	uint64_t puts;        /* blocks stored by kvs_block_put (not deduplicated) */
	uint32_t pins;        /* pins held now */
	size_t meta_bytes;    /* metadata memory: records, index, arenas' slot
				 bookkeeping, sequence table (not the blocks) */
	double meta_bytes_per_block; /* meta_bytes / slots of all tiers */
} kvs_store_stats;

void kvs_store_get_stats(kvs_store *s, kvs_store_stats *out);

/* Checks every internal invariant (slot ownership, reference counts against
 * the sequence table, the prefix index, LRU lists, counters; with
 * KVS_CHECK_CSUM every full block's checksum). O(slots + entries). Returns 0
 * or -EUCLEAN, logging what is wrong. For tests and debugging. */
#define KVS_CHECK_CSUM 0x1u
int kvs_store_check(kvs_store *s, unsigned flags);

#ifdef __cplusplus
}
#endif
#endif
