/* DistAttention kernels: partial attention of decode queries over paged KV
 * blocks, returning (o, lse) per query head, and the exact merge of partials.
 *
 * A node computes a partial over the blocks it holds; partials from several
 * nodes merge into the same result as attention over all blocks at once:
 *
 *   lse_j = m_j + ln sum_t exp(s_t - m_j),  s_t = scale * q . k_t
 *   M = max_j lse_j,  w_j = exp(lse_j - M)
 *   o = sum_j w_j o_j / sum_j w_j,  lse = M + ln sum_j w_j
 *
 * The empty partial is (o = 0, lse = -inf); merging empties gives empty.
 *
 * Block layout (the kvstore's): one block holds `block_tokens` tokens of one
 * sequence for every layer, as [layer][k|v][token][kv_head][head_dim], so one
 * layer's K of one block is contiguous, followed by its V.
 *
 * All functions return 0 or a negative errno code (-EINVAL for bad
 * arguments, -ENOMEM, -ENOSYS where a backend is not built); see
 * kvm_strerror() or strerror(-rc). */
#ifndef KVMESH_KERNELS_DISTATTN_H
#define KVMESH_KERNELS_DISTATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum da_dtype { DA_F32 = 0, DA_F16 = 1, DA_BF16 = 2 } da_dtype;

/* Largest head_dim and head counts the kernels accept. */
#define DA_MAX_HEAD_DIM 512
#define DA_MAX_HEADS 256
#define DA_MAX_BLOCK_TOKENS 4096

/* The shape of one layer's attention over paged blocks. */
typedef struct da_shape {
	uint32_t q_heads;      /* Hq, a multiple of kv_heads */
	uint32_t kv_heads;     /* Hkv: 1 = MQA, Hq = MHA, else GQA */
	uint32_t head_dim;     /* D, 1..DA_MAX_HEAD_DIM */
	uint32_t block_tokens; /* tokens per block, 1..DA_MAX_BLOCK_TOKENS */
	uint32_t layer;        /* which layer of each block to read */
	da_dtype kv_dtype;     /* element type of K and V; accumulation is fp32 */
	float scale;           /* softmax scale, usually 1/sqrt(D) */
} da_shape;

/* A batch of decode queries, each over its own list of blocks.
 * Query i has q_heads * head_dim floats at q + i * q_heads * head_dim and
 * reads blocks[block_start[i] .. block_start[i+1]) in that order. Every block
 * of a list is full except possibly the last; n_tokens[i] counts the valid
 * tokens, so (nb-1)*block_tokens < n_tokens[i] <= nb*block_tokens for a list
 * of nb >= 1 blocks, and n_tokens[i] == 0 for an empty list. */
typedef struct da_batch {
	uint32_t n_queries;
	const float *q;
	const void *const *blocks;   /* block base addresses (all layers) */
	const uint32_t *block_start; /* n_queries + 1 entries, block_start[0] == 0 */
	const uint32_t *n_tokens;    /* n_queries entries */
	uint32_t max_blocks;         /* longest list's block count (a host value):
	                                required by the CUDA path to size its grid,
	                                ignored by the CPU path, which reads the lists */
} da_batch;

/* Bytes of one element of `t`, or 0 for an unknown type. */
size_t da_dtype_size(da_dtype t);

/* Bytes of one block of `layers` layers of this shape (layer is ignored). */
size_t da_block_bytes(const da_shape *s, uint32_t layers);

/* Checks a shape: head counts that divide, sizes in range, known dtype,
 * finite positive scale. Returns 0 or -EINVAL. */
int da_shape_check(const da_shape *s);

/* ---- CPU ---------------------------------------------------------------- */

/* A CPU execution context: a pool of worker threads and their scratch, so the
 * hot loop never allocates. One context serves one caller at a time. */
typedef struct da_ctx da_ctx;

/* Creates a context with n_threads threads in all (the caller counts as one);
 * 0 means one per online CPU. *out is owned by the caller: da_ctx_destroy. */
int da_ctx_create(unsigned n_threads, da_ctx **out);
void da_ctx_destroy(da_ctx *ctx);
unsigned da_ctx_threads(const da_ctx *ctx);

/* The instruction set the CPU kernels use on this machine ("avx2+f16c" or
 * "portable"). Setting KVMESH_DA_ISA=portable in the environment forces the
 * portable path (for tests and benchmarks). */
const char *da_cpu_isa(void);

/* Partial attention for every query and query head of `b`:
 * o[i][h][0..D) (normalised, fp32) and lse[i][h] (natural log). A query with
 * no blocks yields o = 0, lse = -inf. o and lse are caller-owned arrays of
 * n_queries*q_heads*head_dim and n_queries*q_heads floats. Returns 0,
 * -EINVAL for bad arguments (nothing written), or -ENOMEM if the context
 * could not grow its scratch. */
int da_partial_cpu(da_ctx *ctx, const da_shape *s, const da_batch *b, float *o, float *lse);

/* Merges n_parts partial states of `rows` rows (a row is one query head) of
 * head_dim floats each: o_parts[j] points to rows*head_dim floats and
 * lse_parts[j] to rows floats. Writes o_out and lse_out, which may be
 * o_parts[0] and lse_parts[0] (in place) but must not overlap other parts.
 * n_parts == 0 yields the empty state. */
int da_merge_cpu(uint32_t n_parts, uint32_t rows, uint32_t head_dim, const float *const *o_parts,
		 const float *const *lse_parts, float *o_out, float *lse_out);

/* ---- CUDA (built when nvcc is present: KVMESH_HAVE_CUDA) ------------------ */

/* Same operations on the GPU. Every pointer in `b` (q, blocks, block_start,
 * n_tokens, and the block addresses themselves), o, lse and the merge's
 * arrays are device pointers; `stream` is a cudaStream_t (NULL: default).
 * Calls are asynchronous on the stream. A GPU context owns the workspace for
 * splitting long block lists across thread blocks; it belongs to the device
 * current at creation (a call on another device gets -EINVAL) and serves one
 * stream at a time (growing it, which is rare, synchronises the device).
 * Without CUDA these return -ENOSYS; with CUDA, -ENODEV where there is no
 * usable device and -EIO for other CUDA errors (logged to stderr).
 *
 * The host checks what it can see (shape, null pointers, max_blocks); the
 * lists live on the device, so a query whose list is malformed (longer than
 * max_blocks, n_tokens not matching its block count, or a NULL block
 * address) gets NaN in all its o and lse instead of -EINVAL. Blocks may have
 * any address aligned to the element size; 16-byte aligned blocks with
 * head_dim * element size a multiple of 16 take the vector-load path. */
typedef struct da_cuda_ctx da_cuda_ctx;
int da_cuda_ctx_create(da_cuda_ctx **out);
void da_cuda_ctx_destroy(da_cuda_ctx *ctx);
int da_partial_cuda(da_cuda_ctx *ctx, const da_shape *s, const da_batch *b, float *o, float *lse,
		    void *stream);
/* o_parts and lse_parts are device arrays of n_parts device pointers. */
int da_merge_cuda(uint32_t n_parts, uint32_t rows, uint32_t head_dim, const float *const *o_parts,
		  const float *const *lse_parts, float *o_out, float *lse_out, void *stream);

#ifdef __cplusplus
}
#endif
#endif
