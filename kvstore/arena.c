/* Arenas: the slot allocator (shared by every backend) and the host backend. */
#include "kvstore/arena_impl.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

#define SLOT_NONE UINT32_MAX
#define HUGE_2M ((size_t)2 << 20)

void kvs__arena_err(const kvs_arena_opts *o, const char *fmt, ...)
{
	if (!o || !o->err || o->err_len == 0)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(o->err, o->err_len, fmt, ap);
	va_end(ap);
}

int kvs__arena_new(const kvs_arena_opts *o, struct kvs_arena **out)
{
	if (!o || !out || o->slot_bytes == 0 || o->n_slots == 0 || o->n_slots >= SLOT_NONE ||
	    o->slot_bytes > (SIZE_MAX - HUGE_2M) / o->n_slots) {
		kvs__arena_err(o, "arena: slot_bytes and n_slots must be > 0, n_slots < 2^32-1, and their product fit the address space");
		return -EINVAL;
	}
	struct kvs_arena *a = aligned_alloc(64, sizeof *a);
	if (!a)
		return -ENOMEM;
	memset(a, 0, sizeof *a);
	a->slot_bytes = o->slot_bytes;
	a->n_slots = o->n_slots;
	a->device = o->device;
	a->next = calloc(o->n_slots, sizeof *a->next);
	a->gen = calloc(o->n_slots, sizeof *a->gen);
	if (!a->next || !a->gen) {
		kvs__arena_err(o, "arena: no memory for the metadata of %u slots", o->n_slots);
		kvs__arena_free_struct(a);
		return -ENOMEM;
	}
	/* Slot 0 is handed out first; calloc already made every generation 0. */
	for (uint32_t i = 0; i < o->n_slots; i++)
		atomic_init(&a->next[i], i + 1 < o->n_slots ? i + 1 : SLOT_NONE);
	atomic_init(&a->head, 0);
	*out = a;
	return 0;
}

void kvs__arena_free_struct(struct kvs_arena *a)
{
	free((void *)a->next);
	free((void *)a->gen);
	free(a);
}

void kvs_arena_destroy(kvs_arena *a)
{
	if (!a)
		return;
	if (a->ops && a->base)
		a->ops->release(a);
	kvs__arena_free_struct(a);
}

int kvs_arena_alloc(kvs_arena *a, kvs_handle *out)
{
	uint64_t h = atomic_load_explicit(&a->head, memory_order_acquire);
	uint32_t slot;
	for (;;) {
		slot = (uint32_t)h;
		if (slot == SLOT_NONE)
			return -ENOSPC;
		/* This slot may be popped and pushed again by another thread
		 * between our load and our CAS; the tag makes the CAS fail then,
		 * so a stale `nxt` is never installed. */
		uint32_t nxt = atomic_load_explicit(&a->next[slot], memory_order_relaxed);
		uint64_t nh = ((h >> 32) + 1) << 32 | nxt;
		if (atomic_compare_exchange_weak_explicit(&a->head, &h, nh, memory_order_acquire,
							  memory_order_acquire))
			break;
	}
	/* even -> odd: the slot is ours, nobody else writes its generation. */
	uint32_t g = atomic_fetch_add_explicit(&a->gen[slot], 1, memory_order_acq_rel) + 1;
	*out = (kvs_handle)g << 32 | slot;
	return 0;
}

int kvs_arena_free(kvs_arena *a, kvs_handle hd)
{
	uint32_t slot = kvs_handle_slot(hd), g = kvs_handle_gen(hd);
	if (slot >= a->n_slots || !(g & 1))
		return -ESTALE;
	/* The CAS makes a double or stale release fail, even concurrently. */
	if (!atomic_compare_exchange_strong_explicit(&a->gen[slot], &g, g + 1, memory_order_acq_rel,
						     memory_order_relaxed))
		return -ESTALE;
	uint64_t h = atomic_load_explicit(&a->head, memory_order_relaxed);
	for (;;) {
		atomic_store_explicit(&a->next[slot], (uint32_t)h, memory_order_relaxed);
		uint64_t nh = ((h >> 32) + 1) << 32 | slot;
		if (atomic_compare_exchange_weak_explicit(&a->head, &h, nh, memory_order_release,
							  memory_order_relaxed))
			return 0;
	}
}

int kvs_arena_check(const kvs_arena *a, kvs_handle h)
{
	uint32_t slot = kvs_handle_slot(h);
	if (slot >= a->n_slots || !(kvs_handle_gen(h) & 1) ||
	    atomic_load_explicit(&a->gen[slot], memory_order_acquire) != kvs_handle_gen(h))
		return -ESTALE;
	return 0;
}

int kvs_arena_ptr(const kvs_arena *a, kvs_handle h, void **out)
{
	int rc = kvs_arena_check(a, h);
	if (rc)
		return rc;
	*out = a->base + (size_t)kvs_handle_slot(h) * a->slot_bytes;
	return 0;
}

int kvs_arena_read(const kvs_arena *a, kvs_handle h, size_t off, void *buf, size_t len)
{
	void *p;
	if (off > a->slot_bytes || len > a->slot_bytes - off)
		return -EINVAL;
	int rc = kvs_arena_ptr(a, h, &p);
	return rc ? rc : a->ops->copy(buf, (unsigned char *)p + off, len);
}

int kvs_arena_write(kvs_arena *a, kvs_handle h, size_t off, const void *buf, size_t len)
{
	void *p;
	if (off > a->slot_bytes || len > a->slot_bytes - off)
		return -EINVAL;
	int rc = kvs_arena_ptr(a, h, &p);
	return rc ? rc : a->ops->copy((unsigned char *)p + off, buf, len);
}

int kvs_arena_copy(kvs_arena *dst, kvs_handle dh, const kvs_arena *src, kvs_handle sh)
{
	void *d, *s;
	if (dst->slot_bytes != src->slot_bytes)
		return -EINVAL;
	int rc = kvs_arena_ptr(dst, dh, &d);
	if (!rc)
		rc = kvs_arena_ptr(src, sh, &s);
	if (rc)
		return rc;
	/* A GPU backend copies in every direction (unified addressing). */
	const struct kvs_arena_ops *ops = dst->kind == KVS_ARENA_GPU ? dst->ops : src->ops;
	return ops->copy(d, s, dst->slot_bytes);
}

int kvs_arena_checksum(const kvs_arena *a, kvs_handle h, uint64_t *out)
{
	void *p;
	int rc = kvs_arena_ptr(a, h, &p);
	if (rc)
		return rc;
	if (a->kind == KVS_ARENA_HOST) {
		*out = XXH3_64bits(p, a->slot_bytes);
		return 0;
	}
	void *buf = malloc(a->slot_bytes);
	if (!buf)
		return -ENOMEM;
	rc = a->ops->copy(buf, p, a->slot_bytes);
	if (!rc)
		*out = XXH3_64bits(buf, a->slot_bytes);
	free(buf);
	return rc;
}

void kvs_arena_get_info(const kvs_arena *a, kvs_arena_info *out)
{
	out->kind = a->kind;
	out->pages = a->pages;
	out->slot_bytes = a->slot_bytes;
	out->n_slots = a->n_slots;
	out->mapped_bytes = a->mapped_bytes;
	out->meta_bytes = sizeof *a + (size_t)a->n_slots * (sizeof *a->next + sizeof *a->gen);
	out->base = a->base;
}

uint32_t kvs_arena_count_used(const kvs_arena *a)
{
	uint32_t n = 0;
	for (uint32_t i = 0; i < a->n_slots; i++)
		n += atomic_load_explicit(&a->gen[i], memory_order_relaxed) & 1;
	return n;
}

const char *kvs_pages_name(kvs_pages p)
{
	switch (p) {
	case KVS_PAGES_HUGETLB:
		return "hugetlb-2M";
	case KVS_PAGES_THP:
		return "thp";
	case KVS_PAGES_SMALL:
		return "4k";
	case KVS_PAGES_DEVICE:
		return "device";
	}
	return "unknown";
}

/* ---- host backend --------------------------------------------------------- */

static int host_copy(void *dst, const void *src, size_t len)
{
	memcpy(dst, src, len);
	return 0;
}

static void host_release(struct kvs_arena *a)
{
	munmap(a->base, a->mapped_bytes);
}

static const struct kvs_arena_ops host_ops = {.release = host_release, .copy = host_copy};

/* Maps len bytes aligned to 2 MiB (so transparent huge pages can back all of
 * it) by over-mapping and trimming. Returns NULL on failure. */
static void *map_aligned(size_t len, int extra_flags)
{
	size_t over = len + HUGE_2M;
	unsigned char *p = mmap(NULL, over, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS | extra_flags, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	unsigned char *q = (unsigned char *)(((uintptr_t)p + HUGE_2M - 1) & ~(HUGE_2M - 1));
	if (q > p)
		munmap(p, (size_t)(q - p));
	size_t tail = (size_t)(p + over - (q + len));
	if (tail)
		munmap(q + len, tail);
	return q;
}

/* The cgroup v2 memory limit of this process, or SIZE_MAX if none. */
static size_t cgroup_memory_max(void)
{
	FILE *f = fopen("/sys/fs/cgroup/memory.max", "re");
	if (!f)
		return SIZE_MAX;
	unsigned long long v = 0;
	int ok = fscanf(f, "%llu", &v) == 1; /* "max" does not parse: no limit */
	fclose(f);
	return ok && v > 0 ? (size_t)v : SIZE_MAX;
}

static int populate_write(void *p, size_t len)
{
#ifdef MADV_POPULATE_WRITE
	return madvise(p, len, MADV_POPULATE_WRITE);
#else
	(void)p, (void)len;
	return -1;
#endif
}

int kvs_arena_create_host(const kvs_arena_opts *o, kvs_arena **out)
{
	if (!o || o->slot_bytes == 0 || o->n_slots == 0 || o->n_slots >= SLOT_NONE ||
	    o->slot_bytes > (SIZE_MAX - HUGE_2M) / o->n_slots)
		return kvs__arena_new(o, NULL); /* says why and returns -EINVAL */
	size_t bytes = (size_t)o->n_slots * o->slot_bytes;
	size_t len = (bytes + HUGE_2M - 1) & ~(HUGE_2M - 1);

	/* Refuse up front what cannot fit, before touching any memory: with
	 * overcommit the mapping would succeed and the node would be killed
	 * later, under load. */
	long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
	if (pages > 0 && psz > 0 && len / (size_t)psz > (size_t)pages) {
		kvs__arena_err(o,
			       "host arena of %zu bytes (%u slots x %zu) exceeds physical memory "
			       "(%zu bytes)",
			       len, o->n_slots, o->slot_bytes, (size_t)pages * (size_t)psz);
		return -ENOMEM;
	}
	/* In a container the cgroup's limit is the one that kills. */
	size_t lim = cgroup_memory_max();
	if (len > lim) {
		kvs__arena_err(o,
			       "host arena of %zu bytes (%u slots x %zu) exceeds the cgroup memory "
			       "limit (%zu bytes, /sys/fs/cgroup/memory.max)",
			       len, o->n_slots, o->slot_bytes, lim);
		return -ENOMEM;
	}
	struct kvs_arena *a;
	int rc = kvs__arena_new(o, &a);
	if (rc)
		return rc;
	a->kind = KVS_ARENA_HOST;
	a->ops = &host_ops;
	int pop = (o->flags & KVS_ARENA_POPULATE) ? MAP_POPULATE : 0;
	void *p = MAP_FAILED;
	if (!(o->flags & KVS_ARENA_NO_HUGETLB)) {
		p = mmap(NULL, len, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | pop, -1, 0);
		if (p != MAP_FAILED)
			a->pages = KVS_PAGES_HUGETLB;
	}
	if (p == MAP_FAILED) {
		/* No (or too few) reserved huge pages: the usual case. */
		p = map_aligned(len, 0);
		if (!p) {
			kvs__arena_err(o, "host arena: mmap of %zu bytes failed: %s", len,
				       strerror(errno));
			kvs__arena_free_struct(a);
			return -ENOMEM;
		}
		a->pages = KVS_PAGES_SMALL;
		if (!(o->flags & KVS_ARENA_NO_THP) && madvise(p, len, MADV_HUGEPAGE) == 0)
			a->pages = KVS_PAGES_THP;
		if (pop && populate_write(p, len) != 0) {
			/* Older kernels lack MADV_POPULATE_WRITE: touch each page. */
			for (size_t off = 0; off < len; off += (size_t)psz)
				((volatile unsigned char *)p)[off] = 0;
		}
	}
	a->base = p;
	a->mapped_bytes = len;
	*out = a;
	return 0;
}

#ifndef KVMESH_HAVE_CUDA
int kvs_arena_create_gpu(const kvs_arena_opts *o, kvs_arena **out)
{
	(void)out;
	kvs__arena_err(o, "GPU arena: kvmesh was built without CUDA");
	return -ENOSYS;
}
#endif
