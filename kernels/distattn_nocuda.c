/* The CUDA entry points of distattn.h for builds without nvcc: each returns
 * -ENOSYS, so callers link the same symbols either way and learn at run time
 * that there is no GPU path. Built into libkvmesh-nocuda.a (kernels/cuda.mk). */
#include "kernels/distattn.h"

#include <errno.h>

int da_cuda_ctx_create(da_cuda_ctx **out)
{
	if (out)
		*out = NULL;
	return -ENOSYS;
}

void da_cuda_ctx_destroy(da_cuda_ctx *ctx)
{
	(void)ctx;
}

int da_partial_cuda(da_cuda_ctx *ctx, const da_shape *s, const da_batch *b, float *o, float *lse,
		    void *stream)
{
	(void)ctx, (void)s, (void)b, (void)o, (void)lse, (void)stream;
	return -ENOSYS;
}

int da_merge_cuda(uint32_t n_parts, uint32_t rows, uint32_t head_dim, const float *const *o_parts,
		  const float *const *lse_parts, float *o_out, float *lse_out, void *stream)
{
	(void)n_parts, (void)rows, (void)head_dim, (void)o_parts, (void)lse_parts;
	(void)o_out, (void)lse_out, (void)stream;
	return -ENOSYS;
}
