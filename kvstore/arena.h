/* Arenas: one large memory region (host or GPU) cut into equal slots, each
 * slot holding one KV block.
 *
 * Allocation and release are O(1) and lock-free (a tagged Treiber stack), and
 * safe from any number of threads. Every slot has a generation number that
 * changes on allocation and on release, so a handle (slot, generation) names
 * one allocation only: once the slot is released, the handle is refused with
 * -ESTALE by every call, even after the slot has been handed out again.
 *
 * A pointer from kvs_arena_ptr() is only as good as the caller's right to the
 * slot. A reader that may race with the owner's release can validate after
 * reading: if kvs_arena_check() still returns 0 for its handle, the bytes it
 * read were the slot's bytes under that handle (the seqlock pattern).
 *
 * Generations are 32-bit and advance by two per reuse of a slot, so a handle
 * could alias again only after 2^31 reuses of the same slot. */
#ifndef KVMESH_KVSTORE_ARENA_H
#define KVMESH_KVSTORE_ARENA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* (generation << 32) | slot. Generations of allocated slots are odd, so 0 is
 * never a valid handle. */
typedef uint64_t kvs_handle;
#define KVS_HANDLE_NONE ((kvs_handle)0)

static inline uint32_t kvs_handle_slot(kvs_handle h)
{
	return (uint32_t)h;
}
static inline uint32_t kvs_handle_gen(kvs_handle h)
{
	return (uint32_t)(h >> 32);
}

typedef struct kvs_arena kvs_arena;

typedef enum kvs_arena_kind { KVS_ARENA_HOST = 0, KVS_ARENA_GPU = 1 } kvs_arena_kind;

/* What backs a host arena (a GPU arena reports KVS_PAGES_DEVICE). */
typedef enum kvs_pages {
	KVS_PAGES_HUGETLB = 0, /* explicit 2 MiB huge pages (MAP_HUGETLB) */
	KVS_PAGES_THP = 1,     /* 4 KiB pages with transparent huge pages advised */
	KVS_PAGES_SMALL = 2,   /* plain 4 KiB pages */
	KVS_PAGES_DEVICE = 3,  /* GPU memory */
} kvs_pages;

/* Creation flags. */
#define KVS_ARENA_NO_HUGETLB 0x1u /* do not try MAP_HUGETLB */
#define KVS_ARENA_NO_THP 0x2u     /* do not advise transparent huge pages */
#define KVS_ARENA_POPULATE 0x4u   /* fault every page in at creation */

typedef struct kvs_arena_opts {
	size_t slot_bytes; /* bytes of one slot (one block), > 0 */
	uint32_t n_slots;  /* 1 .. 2^32 - 2 */
	unsigned flags;    /* KVS_ARENA_* */
	int device;        /* GPU ordinal (GPU arenas only) */
	char *err;         /* optional, caller-owned: on failure, why, in words */
	size_t err_len;
} kvs_arena_opts;

/* Creates a host arena: one mapping of n_slots * slot_bytes, on 2 MiB huge
 * pages when the system has them, else on transparent huge pages, else small
 * pages. An arena larger than physical memory is refused with -ENOMEM (and
 * a reason in opts->err) rather than failing later. Returns 0, -EINVAL or
 * -ENOMEM. *out is owned by the caller: kvs_arena_destroy. */
int kvs_arena_create_host(const kvs_arena_opts *opts, kvs_arena **out);

/* Creates a GPU arena (one cudaMalloc on opts->device) with the same
 * interface; its pointers are device pointers. Returns -ENOSYS when kvmesh
 * was built without CUDA and -ENODEV when no such device is present. */
int kvs_arena_create_gpu(const kvs_arena_opts *opts, kvs_arena **out);

/* Releases the memory. Every handle and pointer into it dies. NULL is a no-op. */
void kvs_arena_destroy(kvs_arena *a);

/* Takes a free slot. Returns 0 and its handle, or -ENOSPC when none is free. */
int kvs_arena_alloc(kvs_arena *a, kvs_handle *out);

/* Returns the slot of h to the free list. -ESTALE if h is not the current
 * allocation of its slot (already released, or never allocated). */
int kvs_arena_free(kvs_arena *a, kvs_handle h);

/* 0 if h is the current allocation of its slot, else -ESTALE. */
int kvs_arena_check(const kvs_arena *a, kvs_handle h);

/* The address of h's slot (a device pointer in a GPU arena). -ESTALE for a
 * stale handle (*out untouched). */
int kvs_arena_ptr(const kvs_arena *a, kvs_handle h, void **out);

/* Copies len bytes at offset off of h's slot to or from caller memory
 * (host memory, whatever the arena's kind). -EINVAL if off + len exceeds a
 * slot, -ESTALE for a stale handle, -EIO if the device copy failed. */
int kvs_arena_read(const kvs_arena *a, kvs_handle h, size_t off, void *buf, size_t len);
int kvs_arena_write(kvs_arena *a, kvs_handle h, size_t off, const void *buf, size_t len);

/* Copies one whole slot to a slot of another (or the same) arena of the same
 * slot size, across host and GPU as needed. -EINVAL, -ESTALE or -EIO. */
int kvs_arena_copy(kvs_arena *dst, kvs_handle dh, const kvs_arena *src, kvs_handle sh);

/* XXH3-64 of a whole slot's bytes. -ESTALE, or -ENOMEM/-EIO for a GPU slot
 * whose bytes could not be brought to the host. */
int kvs_arena_checksum(const kvs_arena *a, kvs_handle h, uint64_t *out);

typedef struct kvs_arena_info {
	kvs_arena_kind kind;
	kvs_pages pages;
	size_t slot_bytes;
	uint32_t n_slots;
	size_t mapped_bytes; /* memory reserved, including rounding */
	size_t meta_bytes;   /* bookkeeping memory: generations and free list */
	void *base;          /* first slot's address */
} kvs_arena_info;

void kvs_arena_get_info(const kvs_arena *a, kvs_arena_info *out);

/* Slots allocated right now, counted by a scan of the generations (O(n)):
 * for statistics and checks, not for hot paths. Exact only when no other
 * thread allocates or releases meanwhile. */
uint32_t kvs_arena_count_used(const kvs_arena *a);

const char *kvs_pages_name(kvs_pages p);

#ifdef __cplusplus
}
#endif
#endif
