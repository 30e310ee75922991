/* kvstore on a GPU (make test-gpu): the CUDA arena under the arena contract,
 * and a store whose fast tier is GPU memory and slow tier host memory.
 * Needs a build with KVMESH_HAVE_CUDA (kvstore/arena_cuda.c, -lcudart) and a
 * CUDA device; fails, not skips, without one, since test-gpu asks for it. */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>
#include <xxhash.h>

#include "common/kvm_error.h"
#include "kvstore/store.h"

static kvs_arena *gpu(uint32_t n, size_t bytes)
{
	char err[256] = "";
	kvs_arena_opts o = {.slot_bytes = bytes, .n_slots = n, .device = 0, .err = err,
			    .err_len = sizeof err};
	kvs_arena *a = NULL;
	int rc = kvs_arena_create_gpu(&o, &a);
	cr_assert_eq(rc, 0, "GPU arena: %s (%s)", kvm_strerror(rc), err);
	return a;
}

Test(kvstore_gpu, arena_contract)
{
	kvs_arena *a = gpu(64, 1 << 16);
	kvs_arena_info ai;
	kvs_arena_get_info(a, &ai);
	cr_assert_eq(ai.kind, KVS_ARENA_GPU);
	cr_assert_eq(ai.pages, KVS_PAGES_DEVICE);
	kvs_handle h[64], x;
	for (int i = 0; i < 64; i++)
		cr_assert_eq(kvs_arena_alloc(a, &h[i]), 0);
	cr_assert_eq(kvs_arena_alloc(a, &x), -ENOSPC);
	static unsigned char buf[1 << 16], out[1 << 16];
	for (size_t i = 0; i < sizeof buf; i++)
		buf[i] = (unsigned char)(i * 13 + 1);
	cr_assert_eq(kvs_arena_write(a, h[3], 0, buf, sizeof buf), 0);
	cr_assert_eq(kvs_arena_read(a, h[3], 0, out, sizeof out), 0);
	cr_assert_arr_eq(out, buf, sizeof buf);
	uint64_t c;
	cr_assert_eq(kvs_arena_checksum(a, h[3], &c), 0);
	cr_assert_eq(c, XXH3_64bits(buf, sizeof buf));
	/* Device to device, device to host, host to device. */
	kvs_arena_opts ho = {.slot_bytes = 1 << 16, .n_slots = 4, .flags = KVS_ARENA_NO_HUGETLB};
	kvs_arena *host;
	cr_assert_eq(kvs_arena_create_host(&ho, &host), 0);
	kvs_handle hh;
	cr_assert_eq(kvs_arena_alloc(host, &hh), 0);
	cr_assert_eq(kvs_arena_copy(a, h[4], a, h[3]), 0);
	cr_assert_eq(kvs_arena_copy(host, hh, a, h[4]), 0);
	cr_assert_eq(kvs_arena_read(host, hh, 0, out, sizeof out), 0);
	cr_assert_arr_eq(out, buf, sizeof buf);
	memset(buf, 0x5a, sizeof buf);
	cr_assert_eq(kvs_arena_write(host, hh, 0, buf, sizeof buf), 0);
	cr_assert_eq(kvs_arena_copy(a, h[5], host, hh), 0);
	cr_assert_eq(kvs_arena_read(a, h[5], 0, out, sizeof out), 0);
	cr_assert_arr_eq(out, buf, sizeof buf);
	/* Stale handles. */
	cr_assert_eq(kvs_arena_free(a, h[3]), 0);
	cr_assert_eq(kvs_arena_read(a, h[3], 0, out, 1), -ESTALE);
	cr_assert_eq(kvs_arena_alloc(a, &x), 0);
	cr_assert_eq(kvs_handle_slot(x), kvs_handle_slot(h[3]));
	cr_assert_eq(kvs_arena_check(a, h[3]), -ESTALE);
	kvs_arena_destroy(host);
	kvs_arena_destroy(a);
}

Test(kvstore_gpu, too_large_is_a_clear_error)
{
	char err[256] = "";
	kvs_arena_opts o = {.slot_bytes = (size_t)1 << 30, .n_slots = 1u << 20, .err = err,
			    .err_len = sizeof err};
	kvs_arena *a;
	cr_assert_eq(kvs_arena_create_gpu(&o, &a), -ENOMEM);
	cr_assert(strstr(err, "cudaMalloc") != NULL, "%s", err);
}

Test(kvstore_gpu, store_tiers_gpu_and_host)
{
	kvs_geom g = {.layers = 4, .kv_heads = 2, .head_dim = 64, .block_tokens = 16,
		      .dtype = DA_F16};
	size_t bb = kvs_geom_block_bytes(&g);
	kvs_arena *fast = gpu(2, bb), *slow;
	kvs_arena_opts ho = {.slot_bytes = bb, .n_slots = 8, .flags = KVS_ARENA_NO_HUGETLB};
	cr_assert_eq(kvs_arena_create_host(&ho, &slow), 0);
	kvs_store_config c = {.geom = g, .model = 1, .max_seqs = 4};
	c.tiers[0] = fast;
	c.tiers[1] = slow;
	kvs_store *s;
	cr_assert_eq(kvs_store_create(&c, &s), 0);
	uint32_t tok[32];
	unsigned char *img = malloc(bb);
	for (kvs_seq_id q = 1; q <= 3; q++) {
		for (int i = 0; i < 32; i++)
			tok[i] = (uint32_t)(q * 100 + i);
		cr_assert_eq(kvs_seq_create(s, q), 0);
		for (int b = 0; b < 2; b++) {
			kvs_tail_view v;
			cr_assert_eq(kvs_seq_append(s, q, tok + 16 * b, 16, &v), 0);
			memset(img, (int)(q * 16 + b), bb);
			kvs_arena *ar = v.tier == 0 ? fast : slow;
			cr_assert_eq(kvs_arena_write(ar, v.slot, 0, img, bb), 0);
		}
		cr_assert_eq(kvs_seq_seal(s, q), 0);
		cr_assert_eq(kvs_seq_release(s, q), 0); /* cached: demoted as room is needed */
	}
	kvs_store_stats st;
	kvs_store_get_stats(s, &st);
	cr_assert(st.demotions > 0, "GPU -> host moves happened");
	cr_assert_eq(kvs_store_check(s, KVS_CHECK_CSUM), 0);
	/* Taking sequence 1's prefix again brings it back to the GPU. */
	for (int i = 0; i < 32; i++)
		tok[i] = (uint32_t)(100 + i);
	uint32_t m;
	cr_assert_eq(kvs_seq_create(s, 9), 0);
	cr_assert_eq(kvs_seq_attach_prefix(s, 9, tok, 32, &m), 0);
	cr_assert_eq(m, 32);
	kvs_block_ref r[2];
	uint32_t n;
	cr_assert_eq(kvs_seq_blocks(s, 9, 0, r, 2, &n), 0);
	for (int b = 0; b < 2; b++) {
		cr_assert_eq(r[b].tier, 0);
		unsigned char x;
		cr_assert_eq(kvs_arena_read(fast, r[b].slot, bb - 1, &x, 1), 0);
		cr_assert_eq(x, (unsigned char)(16 + b));
	}
	cr_assert_eq(kvs_store_check(s, KVS_CHECK_CSUM), 0);
	free(img);
	kvs_store_destroy(s);
	kvs_arena_destroy(slow);
	kvs_arena_destroy(fast);
}
