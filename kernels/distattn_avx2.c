/* The AVX2 + FMA + F16C inner loops. This file is compiled with -mavx2 -mfma
 * -mf16c; distattn.c calls it only after checking the CPU has those, and only
 * for head_dim a multiple of 8.
 *
 * Decode attention is memory-bound: the loops below aim to read every K and V
 * row of a block once from memory, for all query heads of its group, with
 * enough independent FMA chains that the loads, not the arithmetic, set the
 * pace. Query heads of a group are handled four at a time so that their
 * accumulators stay in registers; a fifth head re-reads the row from L1. */
#include "kernels/distattn_impl.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include <math.h>

/* Eight elements of each KV type, widened to fp32. */
static inline __m256 load8_f32(const float *p)
{
	return _mm256_loadu_ps(p);
}
static inline __m256 load8_f16(const uint16_t *p)
{
	return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline __m256 load8_bf16(const uint16_t *p)
{
	__m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
	return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

static inline float hsum8(__m256 v)
{
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

/* DEFINE_KERNELS(SFX, T, LOAD8) defines score_SFX and accum_SFX for KV
 * elements of C type T read by LOAD8. N (1..4) query heads share each row. */
#define DEFINE_KERNELS(SFX, T, LOAD8)                                                              \
	static inline __attribute__((always_inline)) void dot_rows_##SFX(const T *k, const float *q, uint32_t n, uint32_t d,    \
					  float *out)                                             \
	{                                                                                          \
		__m256 a0[4], a1[4];                                                               \
		for (uint32_t j = 0; j < 4; j++)                                                   \
			a0[j] = a1[j] = _mm256_setzero_ps();                                       \
		uint32_t i = 0;                                                                    \
		for (; i + 16 <= d; i += 16) {                                                     \
			__m256 k0 = LOAD8(k + i), k1 = LOAD8(k + i + 8);                           \
			for (uint32_t j = 0; j < 4; j++) {                                         \
				if (j < n) {                                                       \
					const float *qj = q + (size_t)j * d + i;                   \
					a0[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qj), k0, a0[j]);   \
					a1[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qj + 8), k1,       \
								a1[j]);                            \
				}                                                                  \
			}                                                                          \
		}                                                                                  \
		if (i < d) { /* d % 16 == 8 */                                                     \
			__m256 k0 = LOAD8(k + i);                                                  \
			for (uint32_t j = 0; j < 4; j++)                                           \
				if (j < n)                                                         \
					a0[j] = _mm256_fmadd_ps(                                   \
						_mm256_loadu_ps(q + (size_t)j * d + i), k0,        \
						a0[j]);                                            \
		}                                                                                  \
		for (uint32_t j = 0; j < n; j++)                                                   \
			out[j] = hsum8(_mm256_add_ps(a0[j], a1[j]));                               \
	}                                                                                          \
                                                                                                   \
	static void score_##SFX(const void *Kv, const float *q, const da_dims *dm, uint32_t ntok, \
				float *S)                                                          \
	{                                                                                          \
		const T *K = Kv;                                                                   \
		const uint32_t d = dm->d, G = dm->group;                                           \
		/* Token-major: the block's K is read front to back, as one stream. */             \
		for (uint32_t t = 0; t < ntok; t++) {                                              \
			for (uint32_t h = 0; h < dm->hkv; h++) {                                   \
				const T *k = K + ((size_t)t * dm->hkv + h) * d;                    \
				for (uint32_t g0 = 0; g0 < G; g0 += 4) {                           \
					uint32_t n = G - g0 < 4 ? G - g0 : 4;                      \
					uint32_t hq = h * G + g0;                                  \
					float out[4];                                              \
					const float *qh = q + (size_t)hq * d;                      \
					switch (n) { /* constant n: unrolled, in registers */      \
					case 4: dot_rows_##SFX(k, qh, 4, d, out); break;           \
					case 3: dot_rows_##SFX(k, qh, 3, d, out); break;           \
					case 2: dot_rows_##SFX(k, qh, 2, d, out); break;           \
					default: dot_rows_##SFX(k, qh, 1, d, out);                 \
					}                                                          \
					for (uint32_t j = 0; j < n; j++)                           \
						S[(size_t)(hq + j) * dm->bt + t] = out[j];         \
				}                                                                  \
			}                                                                          \
		}                                                                                  \
	}                                                                                          \
                                                                                                   \
	/* o[j] += sum_t p[j][t] * v[t] over 16 columns starting at i, for n heads. */             \
	static inline __attribute__((always_inline)) void axpy_cols16_##SFX(const T *v, size_t vstride, const float *P,          \
					     uint32_t bt, uint32_t ntok, uint32_t n, float *o,     \
					     uint32_t d, uint32_t i)                               \
	{                                                                                          \
		__m256 a0[4], a1[4];                                                               \
		for (uint32_t j = 0; j < 4; j++) {                                                 \
			if (j < n) {                                                               \
				a0[j] = _mm256_loadu_ps(o + (size_t)j * d + i);                    \
				a1[j] = _mm256_loadu_ps(o + (size_t)j * d + i + 8);                \
			} else {                                                                   \
				a0[j] = a1[j] = _mm256_setzero_ps();                               \
			}                                                                          \
		}                                                                                  \
		for (uint32_t t = 0; t < ntok; t++) {                                              \
			const T *row = v + t * vstride + i;                                        \
			__m256 v0 = LOAD8(row), v1 = LOAD8(row + 8);                               \
			for (uint32_t j = 0; j < 4; j++) {                                         \
				if (j < n) {                                                       \
					__m256 p = _mm256_broadcast_ss(P + (size_t)j * bt + t);    \
					a0[j] = _mm256_fmadd_ps(p, v0, a0[j]);                     \
					a1[j] = _mm256_fmadd_ps(p, v1, a1[j]);                     \
				}                                                                  \
			}                                                                          \
		}                                                                                  \
		for (uint32_t j = 0; j < n; j++) {                                                 \
			_mm256_storeu_ps(o + (size_t)j * d + i, a0[j]);                            \
			_mm256_storeu_ps(o + (size_t)j * d + i + 8, a1[j]);                        \
		}                                                                                  \
	}                                                                                          \
                                                                                                   \
	static inline void axpy_cols8_##SFX(const T *v, size_t vstride, const float *P,           \
					    uint32_t bt, uint32_t ntok, uint32_t n, float *o,      \
					    uint32_t d, uint32_t i)                                \
	{                                                                                          \
		for (uint32_t j = 0; j < n; j++) {                                                 \
			__m256 a = _mm256_loadu_ps(o + (size_t)j * d + i);                         \
			for (uint32_t t = 0; t < ntok; t++)                                        \
				a = _mm256_fmadd_ps(_mm256_broadcast_ss(P + (size_t)j * bt + t),   \
						    LOAD8(v + t * vstride + i), a);                \
			_mm256_storeu_ps(o + (size_t)j * d + i, a);                                \
		}                                                                                  \
	}                                                                                          \
                                                                                                   \
	static void accum_##SFX(const void *Vv, const float *P, const da_dims *dm, uint32_t ntok, \
				float *o)                                                          \
	{                                                                                          \
		const T *V = Vv;                                                                   \
		const uint32_t d = dm->d, G = dm->group;                                           \
		const size_t vstride = (size_t)dm->hkv * d;                                        \
		/* Head-major, tokens innermost: the accumulators of up to four query           \
		 * heads stay in registers across the block's tokens. */                          \
		for (uint32_t h = 0; h < dm->hkv; h++) {                                           \
			const T *v = V + (size_t)h * d;                                            \
			for (uint32_t g0 = 0; g0 < G; g0 += 4) {                                   \
				uint32_t n = G - g0 < 4 ? G - g0 : 4;                              \
				uint32_t hq = h * G + g0;                                          \
				const float *Ph = P + (size_t)hq * dm->bt;                         \
				float *oh = o + (size_t)hq * d;                                    \
				uint32_t i = 0;                                                    \
				for (; i + 16 <= d; i += 16) {                                     \
					switch (n) { /* constant n: unrolled, in registers */      \
					case 4: axpy_cols16_##SFX(v, vstride, Ph, dm->bt, ntok, 4, oh, d, i); break; \
					case 3: axpy_cols16_##SFX(v, vstride, Ph, dm->bt, ntok, 3, oh, d, i); break; \
					case 2: axpy_cols16_##SFX(v, vstride, Ph, dm->bt, ntok, 2, oh, d, i); break; \
					default: axpy_cols16_##SFX(v, vstride, Ph, dm->bt, ntok, 1, oh, d, i); \
					}                                                          \
				}                                                                  \
				if (i < d)                                                         \
					axpy_cols8_##SFX(v, vstride, Ph, dm->bt, ntok, n, oh, d,   \
							 i);                                       \
			}                                                                          \
		}                                                                                  \
	}

DEFINE_KERNELS(f32, float, load8_f32)
DEFINE_KERNELS(f16, uint16_t, load8_f16)
DEFINE_KERNELS(bf16, uint16_t, load8_bf16)

static void score_avx2(const void *K, const float *q, const da_dims *dm, uint32_t ntok, float *S)
{
	switch (dm->dtype) {
	case DA_F16:
		score_f16(K, q, dm, ntok, S);
		break;
	case DA_BF16:
		score_bf16(K, q, dm, ntok, S);
		break;
	default:
		score_f32(K, q, dm, ntok, S);
	}
}

static void accum_avx2(const void *V, const float *P, const da_dims *dm, uint32_t ntok, float *o)
{
	switch (dm->dtype) {
	case DA_F16:
		accum_f16(V, P, dm, ntok, o);
		break;
	case DA_BF16:
		accum_bf16(V, P, dm, ntok, o);
		break;
	default:
		accum_f32(V, P, dm, ntok, o);
	}
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

static float exp_sum_avx2(float *x, uint32_t n, float m)
{
	__m256 vm = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
	uint32_t i = 0;
	for (; i + 8 <= n; i += 8) {
		__m256 e = exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
		_mm256_storeu_ps(x + i, e);
		acc = _mm256_add_ps(acc, e);
	}
	float sum = hsum8(acc);
	for (; i < n; i++) {
		x[i] = expf(x[i] - m);
		sum += x[i];
	}
	return sum;
}

const da_isa da_isa_avx2 = {
	.name = "avx2+f16c",
	.score = score_avx2,
	.accum = accum_avx2,
	.exp_sum = exp_sum_avx2,
};
#endif
