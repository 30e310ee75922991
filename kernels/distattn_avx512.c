/* The AVX-512 inner loops (16 lanes), for CPUs that have AVX-512F (Zen 4/5,
 * Intel server parts): twice the work of AVX2 per instruction, which is what
 * GQA's several query heads per K/V row need to keep up with memory. Compiled
 * with -mavx512f; used only after a CPU check, for head_dim a multiple of 16.
 * The loops are in distattn_simd.inc. */
#include "kernels/distattn_impl.h"

#if defined(__x86_64__) && defined(__AVX512F__)
#include <immintrin.h>
#include <math.h>

typedef __m512 VF;
#define W 16
#define SIMD(name) name##_avx512
#define VZERO() _mm512_setzero_ps()
#define VLOADF(p) _mm512_loadu_ps(p)
#define VSTOREF(p, v) _mm512_storeu_ps(p, v)
#define VFMA(a, b, acc) _mm512_fmadd_ps(a, b, acc)
#define VBCAST(p) _mm512_set1_ps(*(p))
#define VHSUM(v) _mm512_reduce_add_ps(v)
#define VLOAD_F32(p) _mm512_loadu_ps(p)
#define VLOAD_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define VLOAD_BF16(p)                                                                              \
	_mm512_castsi512_ps(                                                                       \
		_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define VEXP_NONPOS(v) exp16_nonpos(v)

/* exp(x) for x <= 0: the same reduction and polynomial as the AVX2 path. */
static inline __m512 exp16_nonpos(__m512 x)
{
	x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
	__m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
	fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
	x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
	x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
	__m512 y = _mm512_set1_ps(1.9875691500E-4f);
	y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
	y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
	y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
	y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
	y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
	y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
	__m512i e = _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127));
	e = _mm512_max_epi32(e, _mm512_setzero_si512());
	return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(e, 23)));
}

/* The lane sums of four vectors, as one __m128 (a transpose-and-add tree:
 * about three instructions a sum instead of eight for separate sums). */
static inline __m128 reduce4_avx512(__m512 a, __m512 b, __m512 c, __m512 d)
{
	__m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
	__m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
	__m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xee));
	__m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
				 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
	return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#define VREDUCE4(a, b, c, d) reduce4_avx512(a, b, c, d)

#define VMAX(a, b) _mm512_max_ps(a, b)
#define VHMAX(v) _mm512_reduce_max_ps(v)

/* Tile sizes (see distattn_simd.inc): 16 accumulators for 4 heads x 4 tokens,
 * 8 tokens for MHA; 32 vector registers leave room for the operands. */
#define SCORE_TN(gb) ((gb) == 1 ? 8 : 4)
#define ACCUM_TN(gb) ((gb) == 1 ? 8 : 4)
#include "kernels/distattn_simd.inc"

const da_isa da_isa_avx512 = {
	.name = "avx512",
	.lanes = 16,
	.score = score_avx512,
	.accum = accum_avx512,
	.softmax_block = softmax_block_avx512,
};
#endif
