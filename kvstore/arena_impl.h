/* Internal to kvstore: the arena object and the per-kind backend operations
 * (host memory, CUDA device memory). Not part of the public API. */
#ifndef KVMESH_KVSTORE_ARENA_IMPL_H
#define KVMESH_KVSTORE_ARENA_IMPL_H

#include <stdalign.h>
#include <stdatomic.h>

#include "kvstore/arena.h"

struct kvs_arena_ops {
	/* Frees the slot memory (not the arena struct). */
	void (*release)(struct kvs_arena *a);
	/* Byte copies where at least one side is this backend's memory; the
	 * other may be host memory or (for the GPU) device memory. 0 or -EIO. */
	int (*copy)(void *dst, const void *src, size_t len);
};

struct kvs_arena {
	/* The free-list head on its own cache line: (tag << 32) | slot, where
	 * the tag counts pushes and pops so a stale CAS cannot succeed (ABA). */
	alignas(64) _Atomic uint64_t head;
	alignas(64) const struct kvs_arena_ops *ops;
	kvs_arena_kind kind;
	kvs_pages pages;
	size_t slot_bytes;
	uint32_t n_slots;
	int device;
	unsigned char *base;
	size_t mapped_bytes;
	_Atomic uint32_t *next; /* free-list links */
	_Atomic uint32_t *gen;  /* even: free; odd: allocated */
};

/* Shared by both backends: allocates the struct and the slot bookkeeping and
 * threads every slot on the free list (base still NULL). */
int kvs__arena_new(const kvs_arena_opts *o, struct kvs_arena **out);
/* Frees what kvs__arena_new allocated. */
void kvs__arena_free_struct(struct kvs_arena *a);
/* Writes a reason into o->err when the caller asked for one. */
void kvs__arena_err(const kvs_arena_opts *o, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#endif
