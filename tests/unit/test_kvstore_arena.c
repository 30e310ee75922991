/* kvstore: geometry, block keys and arenas (host; the GPU arena only as far
 * as "not built / no device"). */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <xxhash.h>

#include "common/kvm_error.h"
#include "kvstore/arena.h"
#include "kvstore/geom.h"
#include "kvstore/key.h"

/* ---- geometry ---------------------------------------------------------------- */

Test(kvstore_geom, block_bytes_and_layout)
{
	kvs_geom g = {.layers = 32, .kv_heads = 8, .head_dim = 128, .block_tokens = 16,
		      .dtype = DA_F16};
	cr_assert_eq(kvs_geom_check(&g), 0);
	/* 2 * layers * kv_heads * head_dim * dtype bytes per token. */
	cr_assert_eq(kvs_geom_block_bytes(&g), (size_t)2 * 32 * 8 * 128 * 2 * 16);
	cr_assert_eq(kvs_geom_offset(&g, 0, 0, 0, 0), 0);
	cr_assert_eq(kvs_geom_offset(&g, 0, 0, 0, 1), 128 * 2);
	cr_assert_eq(kvs_geom_offset(&g, 0, 0, 1, 0), 8 * 128 * 2);
	/* V of layer 0 follows all of layer 0's K. */
	cr_assert_eq(kvs_geom_offset(&g, 0, 1, 0, 0), (size_t)16 * 8 * 128 * 2);
	cr_assert_eq(kvs_geom_offset(&g, 1, 0, 0, 0), (size_t)2 * 16 * 8 * 128 * 2);
	cr_assert_eq(kvs_geom_offset(&g, 31, 1, 15, 7) + 128 * 2, kvs_geom_block_bytes(&g));
}

Test(kvstore_geom, rejects_bad_shapes)
{
	kvs_geom ok = {.layers = 2, .kv_heads = 1, .head_dim = 4, .block_tokens = 4,
		       .dtype = DA_F32};
	kvs_geom g = ok;
	g.layers = 0;
	cr_assert_eq(kvs_geom_check(&g), -EINVAL);
	cr_assert_eq(kvs_geom_block_bytes(&g), 0);
	g = ok;
	g.head_dim = DA_MAX_HEAD_DIM + 1;
	cr_assert_eq(kvs_geom_check(&g), -EINVAL);
	g = ok;
	g.dtype = (da_dtype)7;
	cr_assert_eq(kvs_geom_check(&g), -EINVAL);
	cr_assert_eq(kvs_geom_check(NULL), -EINVAL);
}

/* ---- keys ----------------------------------------------------------------------- */

static kvs_key ref_key(kvs_key parent, uint64_t model, const uint32_t *t, uint32_t n)
{
	static unsigned char buf[24 + 4 * 4096];
	memcpy(buf, &parent.lo, 8);
	memcpy(buf + 8, &parent.hi, 8);
	memcpy(buf + 16, &model, 8);
	memcpy(buf + 24, t, 4 * (size_t)n);
	XXH128_hash_t h = XXH3_128bits(buf, 24 + 4 * (size_t)n);
	return (kvs_key){h.low64, h.high64};
}

Test(kvstore_key, chain_is_xxh3_128_of_parent_model_tokens)
{
	static uint32_t t[4096];
	for (uint32_t i = 0; i < 4096; i++)
		t[i] = i * 2654435761u;
	kvs_key k1 = kvs_key_chain(KVS_KEY_ROOT, 7, t, 16);
	cr_assert(kvs_key_eq(k1, ref_key(KVS_KEY_ROOT, 7, t, 16)));
	kvs_key k2 = kvs_key_chain(k1, 7, t + 16, 16);
	cr_assert(kvs_key_eq(k2, ref_key(k1, 7, t + 16, 16)));
	/* The streaming path (long blocks) hashes the same bytes. */
	cr_assert(kvs_key_eq(kvs_key_chain(k1, 7, t, 4096), ref_key(k1, 7, t, 4096)));
	/* Parent, model and tokens all matter. */
	cr_assert(!kvs_key_eq(kvs_key_chain(k1, 7, t, 16), k1));
	cr_assert(!kvs_key_eq(kvs_key_chain(KVS_KEY_ROOT, 8, t, 16), k1));
	cr_assert(!kvs_key_eq(kvs_key_chain(KVS_KEY_ROOT, 7, t + 1, 16), k1));
}

/* ---- arenas ----------------------------------------------------------------------- */

static kvs_arena *mk(uint32_t n, size_t bytes, unsigned flags)
{
	char err[200] = "";
	kvs_arena_opts o = {.slot_bytes = bytes, .n_slots = n, .flags = flags, .err = err,
			    .err_len = sizeof err};
	kvs_arena *a = NULL;
	int rc = kvs_arena_create_host(&o, &a);
	cr_assert_eq(rc, 0, "create: %s (%s)", kvm_strerror(rc), err);
	return a;
}

Test(kvstore_arena, alloc_all_then_enospc_then_reuse)
{
	kvs_arena *a = mk(64, 4096, 0);
	kvs_handle h[64];
	for (int i = 0; i < 64; i++) {
		cr_assert_eq(kvs_arena_alloc(a, &h[i]), 0);
		cr_assert_neq(h[i], KVS_HANDLE_NONE);
		void *p;
		cr_assert_eq(kvs_arena_ptr(a, h[i], &p), 0);
		memset(p, i, 4096); /* every slot is writable */
	}
	kvs_handle x;
	cr_assert_eq(kvs_arena_alloc(a, &x), -ENOSPC);
	cr_assert_eq(kvs_arena_count_used(a), 64);
	for (int i = 0; i < 64; i++) {
		unsigned char b;
		cr_assert_eq(kvs_arena_read(a, h[i], 4095, &b, 1), 0);
		cr_assert_eq(b, (unsigned char)i, "slot %d overwritten", i);
	}
	for (int i = 0; i < 64; i++)
		cr_assert_eq(kvs_arena_free(a, h[i]), 0);
	cr_assert_eq(kvs_arena_count_used(a), 0);
	cr_assert_eq(kvs_arena_alloc(a, &x), 0);
	kvs_arena_destroy(a);
}

Test(kvstore_arena, stale_handle_refused_after_release_and_reuse)
{
	kvs_arena *a = mk(1, 256, 0);
	kvs_handle old, cur;
	void *p;
	unsigned char b = 1;
	cr_assert_eq(kvs_arena_alloc(a, &old), 0);
	cr_assert_eq(kvs_arena_free(a, old), 0);
	/* Released: refused everywhere, including a second release. */
	cr_assert_eq(kvs_arena_check(a, old), -ESTALE);
	cr_assert_eq(kvs_arena_free(a, old), -ESTALE);
	cr_assert_eq(kvs_arena_alloc(a, &cur), 0);
	cr_assert_eq(kvs_handle_slot(cur), kvs_handle_slot(old), "one slot: reused");
	cr_assert_neq(cur, old);
	/* Reused by someone else: the old handle still reads nothing. */
	cr_assert_eq(kvs_arena_ptr(a, old, &p), -ESTALE);
	cr_assert_eq(kvs_arena_read(a, old, 0, &b, 1), -ESTALE);
	cr_assert_eq(kvs_arena_write(a, old, 0, &b, 1), -ESTALE);
	cr_assert_eq(kvs_arena_free(a, old), -ESTALE);
	uint64_t c;
	cr_assert_eq(kvs_arena_checksum(a, old, &c), -ESTALE);
	cr_assert_eq(kvs_arena_check(a, cur), 0);
	/* Made-up handles. */
	cr_assert_eq(kvs_arena_check(a, KVS_HANDLE_NONE), -ESTALE);
	cr_assert_eq(kvs_arena_check(a, cur + 1), -ESTALE); /* slot out of range */
	cr_assert_eq(kvs_arena_free(a, cur + ((kvs_handle)2 << 32)), -ESTALE);
	cr_assert_eq(kvs_arena_free(a, cur), 0);
	kvs_arena_destroy(a);
}

Test(kvstore_arena, read_write_copy_checksum)
{
	kvs_arena *a = mk(4, 1000, 0), *b = mk(4, 1000, KVS_ARENA_NO_HUGETLB);
	kvs_arena *c = mk(4, 999, KVS_ARENA_NO_HUGETLB);
	kvs_handle ha, hb, hc;
	cr_assert_eq(kvs_arena_alloc(a, &ha), 0);
	cr_assert_eq(kvs_arena_alloc(b, &hb), 0);
	cr_assert_eq(kvs_arena_alloc(c, &hc), 0);
	unsigned char buf[1000], out[1000];
	for (int i = 0; i < 1000; i++)
		buf[i] = (unsigned char)(i * 7);
	cr_assert_eq(kvs_arena_write(a, ha, 0, buf, 1000), 0);
	cr_assert_eq(kvs_arena_write(a, ha, 1, buf, 1000), -EINVAL);
	cr_assert_eq(kvs_arena_read(a, ha, 1001, out, 0), -EINVAL);
	cr_assert_eq(kvs_arena_copy(b, hb, a, ha), 0);
	cr_assert_eq(kvs_arena_read(b, hb, 0, out, 1000), 0);
	cr_assert_arr_eq(out, buf, 1000);
	uint64_t x, y;
	cr_assert_eq(kvs_arena_checksum(a, ha, &x), 0);
	cr_assert_eq(kvs_arena_checksum(b, hb, &y), 0);
	cr_assert_eq(x, XXH3_64bits(buf, 1000));
	cr_assert_eq(x, y);
	cr_assert_eq(kvs_arena_copy(c, hc, a, ha), -EINVAL, "slot sizes differ");
	kvs_arena_destroy(a);
	kvs_arena_destroy(b);
	kvs_arena_destroy(c);
}

Test(kvstore_arena, huge_pages_absent_falls_back)
{
	/* Whatever this machine has, creation succeeds and says what it got. */
	kvs_arena_info ai;
	kvs_arena *a = mk(8, 1 << 20, 0);
	kvs_arena_get_info(a, &ai);
	cr_assert(ai.pages == KVS_PAGES_HUGETLB || ai.pages == KVS_PAGES_THP ||
		  ai.pages == KVS_PAGES_SMALL);
	cr_assert_eq(ai.mapped_bytes % (2u << 20), 0);
	kvs_arena_destroy(a);
	/* Without explicit huge pages: THP (or small pages where THP is off). */
	a = mk(8, 1 << 20, KVS_ARENA_NO_HUGETLB | KVS_ARENA_POPULATE);
	kvs_arena_get_info(a, &ai);
	cr_assert(ai.pages == KVS_PAGES_THP || ai.pages == KVS_PAGES_SMALL);
	cr_assert_eq((uintptr_t)ai.base % (2u << 20), 0, "2 MiB aligned for THP");
	kvs_arena_destroy(a);
	a = mk(8, 1 << 20, KVS_ARENA_NO_HUGETLB | KVS_ARENA_NO_THP);
	kvs_arena_get_info(a, &ai);
	cr_assert_eq(ai.pages, KVS_PAGES_SMALL);
	cr_assert_str_eq(kvs_pages_name(ai.pages), "4k");
	kvs_arena_destroy(a);
}

Test(kvstore_arena, larger_than_memory_is_a_clear_error)
{
	char err[256] = "";
	/* 2^31 slots of 1 MiB: 2 PiB. */
	kvs_arena_opts o = {.slot_bytes = 1 << 20, .n_slots = 1u << 31, .err = err,
			    .err_len = sizeof err};
	kvs_arena *a = (kvs_arena *)0x1;
	cr_assert_eq(kvs_arena_create_host(&o, &a), -ENOMEM);
	cr_assert_eq(a, (kvs_arena *)0x1, "out untouched on failure");
	cr_assert(strstr(err, "exceeds physical memory") != NULL, "err: %s", err);
	o.n_slots = 0;
	cr_assert_eq(kvs_arena_create_host(&o, &a), -EINVAL);
	o.n_slots = UINT32_MAX;
	cr_assert_eq(kvs_arena_create_host(&o, &a), -EINVAL);
}

Test(kvstore_arena, gpu_arena_absent_without_cuda_or_device)
{
	kvs_arena_opts o = {.slot_bytes = 4096, .n_slots = 4};
	kvs_arena *a = NULL;
	int rc = kvs_arena_create_gpu(&o, &a);
	if (rc == 0) { /* a GPU build on a GPU machine: covered by make test-gpu */
		kvs_arena_destroy(a);
		cr_skip_test("a CUDA device is present; see test-gpu");
	}
	cr_assert(rc == -ENOSYS || rc == -ENODEV, "rc=%d", rc);
}

/* ---- concurrency ------------------------------------------------------------------- */

struct thr {
	kvs_arena *a;
	unsigned id;
	unsigned iters;
	atomic_uint *owner; /* per slot: who holds it (0: nobody) */
	unsigned errors;
};

static void *worker(void *arg)
{
	struct thr *t = arg;
	kvs_handle held[8];
	unsigned n = 0;
	uint32_t x = t->id * 2654435761u;
	for (unsigned i = 0; i < t->iters; i++) {
		x = x * 1664525u + 1013904223u;
		if (n < 8 && (n == 0 || (x >> 16) & 1)) {
			kvs_handle h;
			if (kvs_arena_alloc(t->a, &h) != 0)
				continue;
			unsigned prev = 0;
			if (!atomic_compare_exchange_strong(&t->owner[kvs_handle_slot(h)], &prev,
							    t->id))
				t->errors++; /* handed out twice */
			void *p;
			kvs_arena_ptr(t->a, h, &p);
			memset(p, (int)t->id, 64); /* plain writes: TSan checks the hand-over */
			held[n++] = h;
		} else {
			kvs_handle h = held[--n];
			unsigned char b[64];
			kvs_arena_read(t->a, h, 0, b, 64);
			for (int j = 0; j < 64; j++)
				if (b[j] != (unsigned char)t->id)
					t->errors++;
			atomic_store(&t->owner[kvs_handle_slot(h)], 0);
			if (kvs_arena_free(t->a, h) != 0)
				t->errors++;
			if (kvs_arena_free(t->a, h) != -ESTALE) /* double free refused */
				t->errors++;
		}
	}
	while (n) {
		kvs_handle h = held[--n];
		atomic_store(&t->owner[kvs_handle_slot(h)], 0);
		kvs_arena_free(t->a, h);
	}
	return NULL;
}

Test(kvstore_arena, concurrent_alloc_free)
{
	enum { THREADS = 4, SLOTS = 16 };
	kvs_arena *a = mk(SLOTS, 64, KVS_ARENA_NO_HUGETLB);
	atomic_uint owner[SLOTS];
	for (int i = 0; i < SLOTS; i++)
		atomic_init(&owner[i], 0);
	struct thr t[THREADS];
	pthread_t th[THREADS];
	for (unsigned i = 0; i < THREADS; i++) {
		t[i] = (struct thr){.a = a, .id = i + 1, .iters = 200000, .owner = owner};
		cr_assert_eq(pthread_create(&th[i], NULL, worker, &t[i]), 0);
	}
	for (unsigned i = 0; i < THREADS; i++) {
		pthread_join(th[i], NULL);
		cr_assert_eq(t[i].errors, 0, "thread %u saw %u errors", i, t[i].errors);
	}
	cr_assert_eq(kvs_arena_count_used(a), 0);
	/* Every slot is back on the free list exactly once. */
	kvs_handle h[SLOTS], x;
	for (int i = 0; i < SLOTS; i++)
		cr_assert_eq(kvs_arena_alloc(a, &h[i]), 0);
	cr_assert_eq(kvs_arena_alloc(a, &x), -ENOSPC);
	kvs_arena_destroy(a);
}
