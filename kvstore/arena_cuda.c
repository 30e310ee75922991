/* The GPU arena backend: one cudaMalloc per arena, cut into slots by the
 * shared allocator in arena.c. Built only with KVMESH_HAVE_CUDA; plain C
 * against the CUDA runtime API. */
#include "kvstore/arena_impl.h"

#include <cuda_runtime_api.h>
#include <errno.h>

static int gpu_copy(void *dst, const void *src, size_t len)
{
	/* cudaMemcpyDefault: unified addressing tells host from device. */
	return cudaMemcpy(dst, src, len, cudaMemcpyDefault) == cudaSuccess ? 0 : -EIO;
}

static void gpu_release(struct kvs_arena *a)
{
	int prev = 0;
	cudaGetDevice(&prev);
	cudaSetDevice(a->device);
	cudaFree(a->base);
	cudaSetDevice(prev);
}

static const struct kvs_arena_ops gpu_ops = {.release = gpu_release, .copy = gpu_copy};

int kvs_arena_create_gpu(const kvs_arena_opts *o, kvs_arena **out)
{
	int n = 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess || o == NULL || o->device < 0 ||
	    o->device >= n) {
		kvs__arena_err(o, "GPU arena: no CUDA device %d (%d present)", o ? o->device : -1, n);
		return -ENODEV;
	}
	struct kvs_arena *a;
	int rc = kvs__arena_new(o, &a);
	if (rc)
		return rc;
	a->kind = KVS_ARENA_GPU;
	a->pages = KVS_PAGES_DEVICE;
	a->ops = &gpu_ops;
	size_t bytes = (size_t)o->n_slots * o->slot_bytes;
	int prev = 0;
	cudaGetDevice(&prev);
	cudaSetDevice(o->device);
	size_t free_b = 0, total_b = 0;
	cudaMemGetInfo(&free_b, &total_b);
	void *p = NULL;
	cudaError_t e = cudaMalloc(&p, bytes);
	cudaSetDevice(prev);
	if (e != cudaSuccess) {
		kvs__arena_err(o, "GPU arena: cudaMalloc of %zu bytes on device %d failed: %s "
				  "(%zu of %zu bytes free)",
			       bytes, o->device, cudaGetErrorString(e), free_b, total_b);
		kvs__arena_free_struct(a);
		return -ENOMEM;
	}
	a->base = p;
	a->mapped_bytes = bytes;
	*out = a;
	return 0;
}
