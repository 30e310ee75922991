/* The AVX2 + FMA + F16C inner loops (8 lanes). Compiled with -mavx2 -mfma
 * -mf16c; distattn.c calls them only after checking the CPU has those, and
 * only for head_dim a multiple of 8. The loops are in distattn_simd.inc. */
#include "kernels/distattn_impl.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include <math.h>

typedef __m256 VF;
#define W 8
#define SIMD(name) name##_avx2
#define VZERO() _mm256_setzero_ps()
#define VLOADF(p) _mm256_loadu_ps(p)
#define VSTOREF(p, v) _mm256_storeu_ps(p, v)
#define VFMA(a, b, acc) _mm256_fmadd_ps(a, b, acc)
#define VBCAST(p) _mm256_broadcast_ss(p)
#define VHSUM(v) hsum8(v)
#define VLOAD_F32(p) _mm256_loadu_ps(p)
#define VLOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define VLOAD_BF16(p)                                                                              \
	_mm256_castsi256_ps(                                                                       \
		_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define VEXP_NONPOS(v) exp8_nonpos(v)

static inline float hsum8(__m256 v)
{
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

/* exp(x) for x <= 0 (callers subtract the running max first): Cephes'
 * range reduction and degree-5 polynomial, about 2 ulp. Inputs below -87.3
 * give 0, which is below fp32's normal range anyway. */
static inline __m256 exp8_nonpos(__m256 x)
{
	const __m256 lo = _mm256_set1_ps(-87.3f);
	x = _mm256_max_ps(x, lo);
	__m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
	fx = _mm256_floor_ps(fx);
	x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
	x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
	__m256 y = _mm256_set1_ps(1.9875691500E-4f);
	y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
	y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
	y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
	y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
	y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
	y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
	__m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
	e = _mm256_max_epi32(e, _mm256_setzero_si256());
	return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}


/* The lane sums of four vectors, as one __m128 (a transpose-and-add tree:
 * about three instructions a sum instead of eight for separate sums). */
static inline __m128 reduce4_avx2(__m256 a, __m256 b, __m256 c, __m256 d)
{
	__m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
	__m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
	__m256 abcd = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xee));
	return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#define VREDUCE4(a, b, c, d) reduce4_avx2(a, b, c, d)

#define VMAX(a, b) _mm256_max_ps(a, b)
#define VHMAX(v) hmax8(v)

static inline float hmax8(__m256 v)
{
	__m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	s = _mm_max_ps(s, _mm_movehl_ps(s, s));
	s = _mm_max_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

/* Tile sizes (see distattn_simd.inc), for 16 vector registers. */
#define SCORE_TN(gb) ((gb) <= 2 ? 4 : 2)
#define ACCUM_TN(gb) ((gb) == 1 ? 4 : 2)
#include "kernels/distattn_simd.inc"

const da_isa da_isa_avx2 = {
	.name = "avx2+f16c",
	.lanes = 8,
	.score = score_avx2,
	.accum = accum_avx2,
	.softmax_block = softmax_block_avx2,
};
#endif
