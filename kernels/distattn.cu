/* DistAttention on the GPU (flash-decoding).
 *
 * da_partial_cuda launches one thread block (CTA) per (query, kv head, head
 * group, split): the CTA reads the K and V rows of its kv head over a range
 * of `bps` blocks once, for up to GH query heads of the GQA group at a time,
 * and keeps an online softmax per head in registers. When a list is long
 * compared with the GPU, it is cut into several splits whose partial (o, lse)
 * go to the context's workspace and a second kernel merges them; otherwise
 * the CTA writes the result directly.
 *
 * Inside a CTA, "lane groups" of LPT lanes (a power of two up to 32) share one
 * token: each lane loads 16-byte chunks of the token's K and V rows, so a
 * group reads whole rows with coalesced 16-byte loads. Each group walks its
 * own tokens (U at a time, K and V loads issued together), and the groups'
 * states are merged through shared memory at the end. */
#include "kernels/distattn.h"

#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <algorithm>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

namespace {

constexpr int NW = 4;             /* warps per CTA */
constexpr int THREADS = NW * 32;
constexpr int U = 4;              /* tokens a lane group loads per step */
constexpr int ACC_BUDGET = 32;    /* accumulator floats per lane: GH * DPL <= this */
constexpr int MERGE_WARPS = 8;    /* rows (warps) per CTA in the merge kernels */

/* Element types: size, elements per 16-byte chunk, conversion of a chunk. */
struct f32_t {
	static constexpr int SZ = 4;
	static constexpr int CH = 4;
	static __device__ __forceinline__ void cvt(const uint4 &r, float *f)
	{
		f[0] = __uint_as_float(r.x);
		f[1] = __uint_as_float(r.y);
		f[2] = __uint_as_float(r.z);
		f[3] = __uint_as_float(r.w);
	}
};

struct f16_t {
	static constexpr int SZ = 2;
	static constexpr int CH = 8;
	static __device__ __forceinline__ void cvt2(unsigned w, float *f)
	{
		f[0] = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
		f[1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
	}
	static __device__ __forceinline__ void cvt(const uint4 &r, float *f)
	{
		cvt2(r.x, f);
		cvt2(r.y, f + 2);
		cvt2(r.z, f + 4);
		cvt2(r.w, f + 6);
	}
};

struct bf16_t {
	static constexpr int SZ = 2;
	static constexpr int CH = 8;
	/* bf16 is the top half of an fp32: widening is a shift, exactly. */
	static __device__ __forceinline__ void cvt2(unsigned w, float *f)
	{
		f[0] = __uint_as_float(w << 16);
		f[1] = __uint_as_float(w & 0xffff0000u);
	}
	static __device__ __forceinline__ void cvt(const uint4 &r, float *f)
	{
		cvt2(r.x, f);
		cvt2(r.y, f + 2);
		cvt2(r.z, f + 4);
		cvt2(r.w, f + 6);
	}
};

/* Everything a partial-attention launch needs; passed by value. */
struct da_params {
	const float *q;
	const void *const *blocks;
	const uint32_t *block_start;
	const uint32_t *n_tokens;
	float *o, *lse;       /* final outputs */
	float *ws_o, *ws_lse; /* split partials, [row][split], when n_splits > 1 */
	uint32_t n_queries, hq, hkv, group, d, bt, layer;
	uint32_t gh;       /* query heads per CTA (the last head group may have fewer) */
	uint32_t n_hg;     /* head groups per kv head */
	uint32_t lpt;      /* lanes per token, a power of two <= 32 */
	uint32_t vpr;      /* 16-byte chunks per row: ceil(d / CH) */
	uint32_t dp;       /* padded row length in shared memory: vpr * CH */
	uint32_t n_splits; /* splits per query */
	uint32_t bps;      /* blocks per split */
	uint32_t max_blocks;
	uint32_t vec_rows; /* rows are whole 16-byte chunks: d * SZ % 16 == 0 */
	float scale;
};

/* Whether query qi's list is malformed (the host cannot read device lists):
 * longer than max_blocks, or n_tokens not matching its block count. Such a
 * query gets NaN outputs instead of a crash or an out-of-range read. */
__device__ __forceinline__ bool list_bad(const da_params &p, uint32_t qi, uint32_t *nb_out,
					 uint32_t *ntok_out)
{
	const uint32_t first = p.block_start[qi], end = p.block_start[qi + 1];
	const uint64_t nb = (uint64_t)end - first; /* huge if end < first */
	const uint64_t ntok = p.n_tokens[qi];
	*nb_out = (uint32_t)nb;
	*ntok_out = (uint32_t)ntok;
	if (end < first || nb > p.max_blocks)
		return true;
	return nb == 0 ? ntok != 0 : (ntok <= (nb - 1) * p.bt || ntok > nb * p.bt);
}

/* One 16-byte chunk `ch` of a row: a vector load where the row is aligned and
 * holds whole chunks, else byte loads (any alignment, a partial last chunk;
 * bytes past the row read as zero). */
template <class E>
__device__ __forceinline__ uint4 load_chunk(const unsigned char *row, uint32_t ch, uint32_t d,
					    bool vec)
{
	if (vec)
		return __ldg(reinterpret_cast<const uint4 *>(row) + ch);
	unsigned w[4] = {0, 0, 0, 0};
	const uint32_t b0 = ch * 16, row_bytes = d * E::SZ;
#pragma unroll
	for (int i = 0; i < 16; i++)
		if (b0 + i < row_bytes)
			w[i / 4] |= (unsigned)__ldg(row + b0 + i) << (8 * (i % 4));
	return make_uint4(w[0], w[1], w[2], w[3]);
}

/* Partial attention; see the file comment. CPL: 16-byte chunks per lane and
 * row (lpt == 32 when CPL > 1); GH: query heads per CTA at most. */
template <class E, int CPL, int GH>
__global__ void __launch_bounds__(THREADS) partial_kernel(const da_params p)
{
	constexpr int CH = E::CH;
	constexpr int DPL = CPL * CH; /* floats of a row each lane holds */
	extern __shared__ float4 smem4[];
	float *const smem = reinterpret_cast<float *>(smem4);

	/* The head group varies fastest, so CTAs that read the same K/V rows run
	 * side by side and the second read comes from L2. */
	uint32_t x = blockIdx.x;
	const uint32_t hg = x % p.n_hg;
	x /= p.n_hg;
	const uint32_t kvh = x % p.hkv;
	x /= p.hkv;
	const uint32_t split = x % p.n_splits;
	const uint32_t qi = x / p.n_splits;

	uint32_t nb, ntok;
	const bool bad_list = list_bad(p, qi, &nb, &ntok);
	const uint32_t b0 = split * p.bps;
	/* Splits past a list's end write nothing: the merge reads only as many
	 * splits as the list has. Split 0 always writes (the empty state too). */
	if (split > 0 && (bad_list || b0 >= nb))
		return;
	const uint32_t h_first = kvh * p.group + hg * p.gh;
	const uint32_t gh = min(p.gh, p.group - hg * p.gh);
	const uint32_t d = p.d, dp = p.dp;

	/* Shared memory: q [GH][dp] | group outputs [ng][GH][dp] | group m, l
	 * [ng][GH] each | per-head weights scratch. */
	const uint32_t gpw = 32 / p.lpt, ng = NW * gpw;
	float *const sq = smem;
	float *const so = sq + GH * dp;
	float *const sm = so + ng * GH * dp;
	float *const sl = sm + ng * GH;
	float *const sML = sl + ng * GH; /* [GH][2]: 1/L and lse per head */

	/* q, scaled as the CPU path does, zero-padded to dp and to GH heads. */
	for (uint32_t i = threadIdx.x; i < GH * dp; i += THREADS) {
		const uint32_t g = i / dp, e = i - g * dp;
		sq[i] = (g < gh && e < d) ? p.q[((size_t)qi * p.hq + h_first + g) * d + e] * p.scale
					  : 0.0f;
	}
	__syncthreads();

	const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	const uint32_t lig = lane & (p.lpt - 1); /* lane in group */
	const uint32_t giw = lane / p.lpt;       /* group in warp */
	const uint32_t grp = warp * gpw + giw;

	float acc[GH][DPL], m[GH], l[GH];
#pragma unroll
	for (int g = 0; g < GH; g++) {
		m[g] = -INFINITY;
		l[g] = 0.0f;
#pragma unroll
		for (int k = 0; k < DPL; k++)
			acc[g][k] = 0.0f;
	}

	/* Byte offsets inside a block: [layer][k|v][token][kv_head][d]. */
	const size_t row_bytes = (size_t)d * E::SZ;
	const size_t tok_stride = (size_t)p.hkv * row_bytes;
	const size_t k_off = (size_t)p.layer * 2 * p.bt * tok_stride + kvh * row_bytes;
	const size_t v_delta = (size_t)p.bt * tok_stride;
	const void *const *const blist = p.blocks + p.block_start[qi];

	const uint64_t tok_begin = (uint64_t)b0 * p.bt;
	const uint64_t tok_end =
		bad_list ? 0 : min((uint64_t)ntok, min((uint64_t)nb, (uint64_t)b0 + p.bps) * p.bt);
	bool null_block = false;

	/* The loop bound is the same for every lane of a warp, so the shuffles
	 * below always run with the whole warp. */
	for (uint64_t base = tok_begin + (uint64_t)warp * gpw * U; base < tok_end;
	     base += (uint64_t)ng * U) {
		const uint64_t f0 = base + (uint64_t)giw * U;
		uint4 kr[U][CPL], vr[U][CPL];
		bool valid[U];
		/* Any valid token has f0 < tok_end <= 2^32 - 1: 32 bits do. */
		const uint32_t f = f0 < tok_end ? (uint32_t)f0 : 0;
		uint32_t blk = f / p.bt, t = f - blk * p.bt;
#pragma unroll
		for (int u = 0; u < U; u++) {
			valid[u] = f0 + u < tok_end;
			const unsigned char *krow = nullptr;
			bool vec = false;
			if (valid[u]) {
				const unsigned char *bp = static_cast<const unsigned char *>(blist[blk]);
				if (!bp) {
					null_block = true;
					valid[u] = false;
				} else {
					vec = p.vec_rows && ((uintptr_t)bp & 15) == 0;
					krow = bp + k_off + (size_t)t * tok_stride;
				}
			}
#pragma unroll
			for (int c = 0; c < CPL; c++) {
				const uint32_t ch = lig + c * p.lpt;
				kr[u][c] = vr[u][c] = make_uint4(0, 0, 0, 0);
				if (valid[u] && ch < p.vpr) {
					kr[u][c] = load_chunk<E>(krow, ch, d, vec);
					vr[u][c] = load_chunk<E>(krow + v_delta, ch, d, vec);
				}
			}
			if (++t == p.bt) {
				t = 0;
				blk++;
			}
		}

		/* Scores: each lane's share of q . k, summed over the group. */
		float s[U][GH];
#pragma unroll
		for (int u = 0; u < U; u++)
#pragma unroll
			for (int g = 0; g < GH; g++)
				s[u][g] = 0.0f;
#pragma unroll
		for (int c = 0; c < CPL; c++) {
			const uint32_t ch = lig + c * p.lpt;
			if (ch >= p.vpr)
				continue;
			float kf[U][CH];
#pragma unroll
			for (int u = 0; u < U; u++)
				E::cvt(kr[u][c], kf[u]);
#pragma unroll
			for (int g = 0; g < GH; g++) {
				const float4 *qv = reinterpret_cast<const float4 *>(sq + g * dp + ch * CH);
#pragma unroll
				for (int k4 = 0; k4 < CH / 4; k4++) {
					const float4 qq = qv[k4];
#pragma unroll
					for (int u = 0; u < U; u++) {
						float a = s[u][g];
						a = fmaf(qq.x, kf[u][4 * k4 + 0], a);
						a = fmaf(qq.y, kf[u][4 * k4 + 1], a);
						a = fmaf(qq.z, kf[u][4 * k4 + 2], a);
						a = fmaf(qq.w, kf[u][4 * k4 + 3], a);
						s[u][g] = a;
					}
				}
			}
		}
		for (uint32_t off = p.lpt >> 1; off > 0; off >>= 1)
#pragma unroll
			for (int u = 0; u < U; u++)
#pragma unroll
				for (int g = 0; g < GH; g++)
					s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);

		/* Online softmax, one rescale per step rather than per token. */
#pragma unroll
		for (int g = 0; g < GH; g++) {
			float mt = m[g];
#pragma unroll
			for (int u = 0; u < U; u++) {
				if (!valid[u])
					s[u][g] = -INFINITY;
				mt = fmaxf(mt, s[u][g]);
			}
			if (mt == -INFINITY) { /* nothing seen yet: keep the empty state */
#pragma unroll
				for (int u = 0; u < U; u++)
					s[u][g] = 0.0f;
				continue;
			}
			const float corr = __expf(m[g] - mt); /* 0 when m was -inf */
			float lsum = l[g] * corr;
#pragma unroll
			for (int k = 0; k < DPL; k++)
				acc[g][k] *= corr;
#pragma unroll
			for (int u = 0; u < U; u++) {
				s[u][g] = __expf(s[u][g] - mt); /* 0 for invalid tokens */
				lsum += s[u][g];
			}
			l[g] = lsum;
			m[g] = mt;
		}

		/* o += p * v; v of an invalid token is zero, as is its p. */
#pragma unroll
		for (int c = 0; c < CPL; c++) {
#pragma unroll
			for (int u = 0; u < U; u++) {
				float vf[CH];
				E::cvt(vr[u][c], vf);
#pragma unroll
				for (int g = 0; g < GH; g++)
#pragma unroll
					for (int k = 0; k < CH; k++)
						acc[g][c * CH + k] = fmaf(s[u][g], vf[k], acc[g][c * CH + k]);
			}
		}
	}

	/* Merge the groups' states: M = max m, w = exp(m - M), L = sum w l,
	 * o = sum w acc / L (acc is unnormalised, so this is exact). */
	if (lig == 0) {
#pragma unroll
		for (int g = 0; g < GH; g++) {
			sm[grp * GH + g] = m[g];
			sl[grp * GH + g] = l[g];
		}
	}
#pragma unroll
	for (int c = 0; c < CPL; c++) {
		const uint32_t ch = lig + c * p.lpt;
		if (ch < p.vpr) {
#pragma unroll
			for (int g = 0; g < GH; g++)
#pragma unroll
				for (int k = 0; k < CH; k++)
					so[(grp * GH + g) * dp + ch * CH + k] = acc[g][c * CH + k];
		}
	}
	const bool any_null = __syncthreads_or(null_block);

	/* One thread per head: weights in place of m, then 1/L and lse. */
	if (threadIdx.x < (uint32_t)GH) {
		const uint32_t g = threadIdx.x;
		float M = -INFINITY;
		for (uint32_t j = 0; j < ng; j++)
			M = fmaxf(M, sm[j * GH + g]);
		float L = 0.0f;
		for (uint32_t j = 0; j < ng; j++) {
			const float w = M == -INFINITY ? 0.0f : expf(sm[j * GH + g] - M);
			sm[j * GH + g] = w;
			L += w * sl[j * GH + g];
		}
		sML[2 * g] = L > 0.0f ? 1.0f / L : 0.0f;
		sML[2 * g + 1] = L > 0.0f ? M + logf(L) : -INFINITY;
	}
	__syncthreads();

	const bool nan_out = bad_list || any_null;
	const bool direct = p.n_splits == 1;
	for (uint32_t i = threadIdx.x; i < gh * d; i += THREADS) {
		const uint32_t g = i / d, e = i - g * d;
		float O = 0.0f;
		for (uint32_t j = 0; j < ng; j++)
			O = fmaf(sm[j * GH + g], so[(j * GH + g) * dp + e], O);
		O *= sML[2 * g];
		const size_t row = (size_t)qi * p.hq + h_first + g;
		float *dst = direct ? p.o + row * d : p.ws_o + (row * p.n_splits + split) * d;
		dst[e] = nan_out ? NAN : O;
		if (e == 0) {
			float *ldst = direct ? p.lse + row : p.ws_lse + row * p.n_splits + split;
			*ldst = nan_out ? NAN : sML[2 * g + 1];
		}
	}
}

/* Merge of n partial rows by one warp, as da_merge_cpu computes it: the sum
 * of w_j * o_j in part order, times 1/W. Src gives part j's o row and lse. */
template <class Src>
__device__ __forceinline__ void merge_row(const Src &src, uint32_t n, uint32_t d, float *o_out,
					  float *lse_out, uint32_t lane)
{
	float M = -INFINITY;
	for (uint32_t j = lane; j < n; j += 32)
		M = fmaxf(M, src.lse(j));
	for (int off = 16; off > 0; off >>= 1)
		M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
	if (M == -INFINITY) { /* every part empty, or none: the empty state */
		for (uint32_t e = lane; e < d; e += 32)
			o_out[e] = 0.0f;
		__syncwarp();
		if (lane == 0)
			*lse_out = -INFINITY;
		return;
	}
	/* Every lane sums the weights in the same order as the CPU. */
	float W = 0.0f;
	for (uint32_t j = 0; j < n; j++)
		W += expf(src.lse(j) - M);
	const float inv = 1.0f / W;
	for (uint32_t e = lane; e < d; e += 32) {
		float a = 0.0f;
		for (uint32_t j = 0; j < n; j++) {
			const float w = expf(src.lse(j) - M);
			if (w != 0.0f)
				a += w * src.o(j)[e];
		}
		o_out[e] = a * inv;
	}
	/* In place, lse_out may be part 0's lse, which other lanes read above. */
	__syncwarp();
	if (lane == 0)
		*lse_out = M + logf(W);
}

struct split_src {
	const float *o_row; /* split 0 of this row */
	const float *lse_row;
	uint32_t d;
	__device__ float lse(uint32_t j) const { return lse_row[j]; }
	__device__ const float *o(uint32_t j) const { return o_row + (size_t)j * d; }
};

struct parts_src {
	const float *const *o_parts;
	const float *const *lse_parts;
	size_t row;
	uint32_t d;
	__device__ float lse(uint32_t j) const { return lse_parts[j][row]; }
	__device__ const float *o(uint32_t j) const { return o_parts[j] + row * d; }
};

/* Merges the splits of each (query, query head) row into o and lse. */
__global__ void __launch_bounds__(MERGE_WARPS * 32) split_merge_kernel(const da_params p)
{
	const uint64_t row = (uint64_t)blockIdx.x * MERGE_WARPS + (threadIdx.x >> 5);
	if (row >= (uint64_t)p.n_queries * p.hq)
		return;
	const uint32_t lane = threadIdx.x & 31, qi = (uint32_t)(row / p.hq);
	float *o = p.o + row * p.d, *lse = p.lse + row;
	uint32_t nb, ntok;
	if (list_bad(p, qi, &nb, &ntok)) {
		for (uint32_t e = lane; e < p.d; e += 32)
			o[e] = NAN;
		if (lane == 0)
			*lse = NAN;
		return;
	}
	/* The splits this list has: split 0 always, then one per bps blocks. */
	const uint32_t n = nb == 0 ? 1 : (uint32_t)(((uint64_t)nb + p.bps - 1) / p.bps);
	const split_src src = {p.ws_o + row * p.n_splits * p.d, p.ws_lse + row * p.n_splits, p.d};
	/* A split that met a null block wrote NaN; the merge would drop it
	 * (fmaxf ignores NaN), so pass it on here. */
	bool nan_split = false;
	for (uint32_t j = lane; j < n; j += 32)
		nan_split |= isnan(src.lse(j));
	if (__any_sync(0xffffffffu, nan_split)) {
		for (uint32_t e = lane; e < p.d; e += 32)
			o[e] = NAN;
		if (lane == 0)
			*lse = NAN;
		return;
	}
	merge_row(src, n, p.d, o, lse, lane);
}

__global__ void __launch_bounds__(MERGE_WARPS * 32)
	parts_merge_kernel(uint32_t n_parts, uint32_t rows, uint32_t d,
			   const float *const *o_parts, const float *const *lse_parts,
			   float *o_out, float *lse_out)
{
	const uint64_t row = (uint64_t)blockIdx.x * MERGE_WARPS + (threadIdx.x >> 5);
	if (row >= rows)
		return;
	const parts_src src = {o_parts, lse_parts, (size_t)row, d};
	merge_row(src, n_parts, d, o_out + row * d, lse_out + row, threadIdx.x & 31);
}

typedef void (*partial_fn)(const da_params);

/* The instantiation for an element type, chunks per lane and head-group size
 * (GH a power of two within the register budget; see pick_gh). */
constexpr int gh_cap(int cpl, int ch)
{
	return ACC_BUDGET / (cpl * ch) >= 8 ? 8 : ACC_BUDGET / (cpl * ch) >= 4 ? 4
		: ACC_BUDGET / (cpl * ch) >= 2 ? 2 : 1;
}

constexpr int cmin(int a, int b)
{
	return a < b ? a : b;
}

/* The host keeps gh <= gh_cap, so GH = gh rounded up to a power of two;
 * cmin only stops instantiations that are never picked. */
template <class E, int CPL>
partial_fn pick_gh(uint32_t gh)
{
	constexpr int cap = gh_cap(CPL, E::CH);
	if (gh <= 1)
		return partial_kernel<E, CPL, 1>;
	if (gh <= 2)
		return partial_kernel<E, CPL, cmin(2, cap)>;
	if (gh <= 4)
		return partial_kernel<E, CPL, cmin(4, cap)>;
	return partial_kernel<E, CPL, cmin(8, cap)>;
}

/* CPL 4 only occurs for fp32 (a 512-float row is 128 chunks); 2-byte types
 * have at most 64 chunks a row. */
template <class E>
partial_fn pick_cpl(uint32_t cpl, uint32_t gh)
{
	if (cpl == 1)
		return pick_gh<E, 1>(gh);
	if constexpr (E::SZ == 4) {
		if (cpl == 4)
			return pick_gh<E, 4>(gh);
	}
	return pick_gh<E, 2>(gh);
}

int cuda_fail(cudaError_t e, const char *op)
{
	fprintf(stderr, "level=error component=distattn_cuda op=%s cuda_error=%s msg=\"%s\"\n", op,
		cudaGetErrorName(e), cudaGetErrorString(e));
	switch (e) {
	case cudaErrorMemoryAllocation:
		return -ENOMEM;
	case cudaErrorNoDevice:
	case cudaErrorInsufficientDriver:
	case cudaErrorInvalidDevice:
		return -ENODEV;
	default:
		return -EIO;
	}
}

#define CUDA_TRY(call, op)                           \
	do {                                         \
		cudaError_t e_ = (call);             \
		if (e_ != cudaSuccess)               \
			return cuda_fail(e_, op);    \
	} while (0)

uint32_t div_up(uint64_t a, uint64_t b)
{
	return (uint32_t)((a + b - 1) / b);
}

} /* namespace */

/* CTAs per multiprocessor of one kernel at one shared-memory size, cached:
 * the occupancy query costs microseconds, as much as a short call's kernel. */
struct occ_entry {
	partial_fn fn;
	size_t smem;
	int per_sm;
};

struct da_cuda_ctx {
	int device;
	int n_sm;
	void *ws; /* split partials: o then lse */
	size_t ws_bytes;
	occ_entry occ[16];
	unsigned n_occ;
};

static int occupancy(da_cuda_ctx *ctx, partial_fn fn, size_t smem, int *per_sm)
{
	for (unsigned i = 0; i < ctx->n_occ; i++)
		if (ctx->occ[i].fn == fn && ctx->occ[i].smem == smem) {
			*per_sm = ctx->occ[i].per_sm;
			return 0;
		}
	int n = 0;
	CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, THREADS, smem), "occupancy");
	*per_sm = n > 0 ? n : 1;
	const unsigned slot = ctx->n_occ < 16 ? ctx->n_occ++ : (unsigned)(smem % 16);
	ctx->occ[slot] = occ_entry{fn, smem, *per_sm};
	return 0;
}

extern "C" int da_cuda_ctx_create(da_cuda_ctx **out)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	int dev = 0, n_sm = 0;
	CUDA_TRY(cudaGetDevice(&dev), "get_device");
	CUDA_TRY(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev), "device_attr");
	da_cuda_ctx *ctx = static_cast<da_cuda_ctx *>(calloc(1, sizeof(*ctx)));
	if (!ctx)
		return -ENOMEM;
	ctx->device = dev;
	ctx->n_sm = n_sm > 0 ? n_sm : 1;
	*out = ctx;
	return 0;
}

extern "C" void da_cuda_ctx_destroy(da_cuda_ctx *ctx)
{
	if (!ctx)
		return;
	if (ctx->ws) {
		cudaError_t e = cudaFree(ctx->ws);
		if (e != cudaSuccess)
			cuda_fail(e, "free_workspace");
	}
	free(ctx);
}

/* The fraction of the CTA slots of all its waves that a grid of `total`
 * CTAs fills: equal CTAs finish wave by wave, so 2.2 waves take as long as 3. */
static double wave_fill(uint64_t total, uint64_t slots)
{
	return (double)total / (double)(div_up(total, slots) * slots);
}

/* Cuts lists of up to max_blocks blocks into n_splits splits of bps blocks:
 * at least two waves of CTAs where the lists are long enough (a split has
 * at least min_bps blocks), then, among a few more splits, the count whose
 * waves are fullest; the grid stays within gridDim.x. */
static void choose_splits(uint32_t max_blocks, uint32_t min_bps, uint64_t ctas_per_split,
			  uint64_t slots, uint32_t *bps, uint32_t *n_splits)
{
	*bps = 1;
	*n_splits = 1;
	if (max_blocks == 0)
		return;
	uint64_t most = div_up(max_blocks, min_bps);
	most = std::min<uint64_t>(most, INT32_MAX / ctas_per_split);
	if (most < 1)
		most = 1;
	uint64_t lo = std::min<uint64_t>(most, div_up(2 * slots, ctas_per_split));
	if (lo < 1)
		lo = 1;
	const uint64_t hi = std::min<uint64_t>(most, 2 * lo + 2);
	double best = -1.0;
	for (uint64_t s = lo; s <= hi && s < lo + 64; s++) {
		const uint32_t b = div_up(max_blocks, s), n = div_up(max_blocks, b);
		const double fill = wave_fill(ctas_per_split * n, slots);
		if (fill > best + 0.02) { /* fewer splits unless clearly fuller */
			best = fill;
			*bps = b;
			*n_splits = n;
		}
	}
}

/* Makes the workspace at least `bytes` long. Rare (the hot path reuses it):
 * it waits for the device so that no queued kernel still uses the old one. */
static int ws_reserve(da_cuda_ctx *ctx, size_t bytes)
{
	if (bytes <= ctx->ws_bytes)
		return 0;
	size_t want = bytes + bytes / 2;
	CUDA_TRY(cudaDeviceSynchronize(), "sync_before_grow");
	if (ctx->ws) {
		CUDA_TRY(cudaFree(ctx->ws), "free_workspace");
		ctx->ws = NULL;
		ctx->ws_bytes = 0;
	}
	CUDA_TRY(cudaMalloc(&ctx->ws, want), "alloc_workspace");
	ctx->ws_bytes = want;
	return 0;
}

extern "C" int da_partial_cuda(da_cuda_ctx *ctx, const da_shape *s, const da_batch *b, float *o,
			       float *lse, void *stream)
{
	if (!ctx || !b || da_shape_check(s) != 0)
		return -EINVAL;
	if (b->n_queries == 0)
		return 0;
	if (!b->q || !b->block_start || !b->n_tokens || !o || !lse ||
	    (b->max_blocks > 0 && !b->blocks))
		return -EINVAL;
	/* n_tokens is 32-bit, so no valid list is longer than this. */
	if (b->max_blocks > div_up(UINT32_MAX, s->block_tokens))
		return -EINVAL;
	/* The workspace and the cached occupancy belong to ctx's device. */
	int dev = -1;
	CUDA_TRY(cudaGetDevice(&dev), "get_device");
	if (dev != ctx->device)
		return -EINVAL;

	const size_t esz = da_dtype_size(s->kv_dtype);
	const uint32_t ch = (uint32_t)(16 / esz);
	da_params p = {};
	p.q = b->q;
	p.blocks = b->blocks;
	p.block_start = b->block_start;
	p.n_tokens = b->n_tokens;
	p.o = o;
	p.lse = lse;
	p.n_queries = b->n_queries;
	p.hq = s->q_heads;
	p.hkv = s->kv_heads;
	p.group = s->q_heads / s->kv_heads;
	p.d = s->head_dim;
	p.bt = s->block_tokens;
	p.layer = s->layer;
	p.max_blocks = b->max_blocks;
	p.scale = s->scale;
	p.vpr = div_up(p.d, ch);
	p.dp = p.vpr * ch;
	p.vec_rows = (p.d * esz) % 16 == 0;

	uint32_t cpl = 1;
	p.lpt = 1;
	while (p.lpt < p.vpr && p.lpt < 32)
		p.lpt *= 2;
	if (p.vpr > 32)
		cpl = p.vpr <= 64 ? 2 : 4;

	/* Head groups: as few as the register budget allows, evenly sized. */
	const uint32_t cap = (uint32_t)gh_cap((int)cpl, (int)ch);
	p.gh = div_up(p.group, div_up(p.group, cap));
	p.n_hg = div_up(p.group, p.gh); /* so every head group is non-empty */

	partial_fn fn;
	switch (s->kv_dtype) {
	case DA_F32:
		fn = pick_cpl<f32_t>(cpl, p.gh);
		break;
	case DA_F16:
		fn = pick_cpl<f16_t>(cpl, p.gh);
		break;
	default:
		fn = pick_cpl<bf16_t>(cpl, p.gh);
		break;
	}
	/* GH of the chosen instantiation, for the shared-memory size. */
	const uint32_t gh_inst = p.gh <= 1 ? 1 : p.gh <= 2 ? 2 : p.gh <= 4 ? 4 : 8;
	const uint32_t ng = NW * (32 / p.lpt);
	const size_t smem =
		sizeof(float) * ((size_t)gh_inst * p.dp * (1 + ng) + 2 * (size_t)ng * gh_inst + 2 * gh_inst);

	int per_sm = 1;
	int rc = occupancy(ctx, fn, smem, &per_sm);
	if (rc != 0)
		return rc;
	const uint64_t ctas_per_split = (uint64_t)b->n_queries * p.hkv * p.n_hg;
	if (ctas_per_split > INT32_MAX)
		return -EINVAL;
	/* At least 8 steps of U tokens per lane group and CTA. */
	const uint32_t min_bps = div_up((uint64_t)ng * U * 8, p.bt);
	choose_splits(b->max_blocks, min_bps, ctas_per_split, (uint64_t)ctx->n_sm * per_sm, &p.bps,
		      &p.n_splits);

	cudaStream_t st = static_cast<cudaStream_t>(stream);
	if (p.n_splits > 1) {
		const size_t rows = (size_t)b->n_queries * p.hq * p.n_splits;
		const size_t o_bytes = rows * p.d * sizeof(float);
		rc = ws_reserve(ctx, o_bytes + rows * sizeof(float));
		if (rc != 0)
			return rc;
		p.ws_o = static_cast<float *>(ctx->ws);
		p.ws_lse = reinterpret_cast<float *>(static_cast<char *>(ctx->ws) + o_bytes);
	}

	fn<<<(unsigned)(ctas_per_split * p.n_splits), THREADS, smem, st>>>(p);
	CUDA_TRY(cudaGetLastError(), "launch_partial");
	if (p.n_splits > 1) {
		const uint64_t rows = (uint64_t)b->n_queries * p.hq;
		split_merge_kernel<<<div_up(rows, MERGE_WARPS), MERGE_WARPS * 32, 0, st>>>(p);
		CUDA_TRY(cudaGetLastError(), "launch_split_merge");
	}
	return 0;
}

extern "C" int da_merge_cuda(uint32_t n_parts, uint32_t rows, uint32_t head_dim,
			     const float *const *o_parts, const float *const *lse_parts, float *o_out,
			     float *lse_out, void *stream)
{
	if (head_dim == 0 || !o_out || !lse_out || (n_parts > 0 && (!o_parts || !lse_parts)))
		return -EINVAL;
	if (rows == 0)
		return 0;
	cudaStream_t st = static_cast<cudaStream_t>(stream);
	parts_merge_kernel<<<div_up(rows, MERGE_WARPS), MERGE_WARPS * 32, 0, st>>>(
		n_parts, rows, head_dim, o_parts, lse_parts, o_out, lse_out);
	CUDA_TRY(cudaGetLastError(), "launch_merge");
	return 0;
}
