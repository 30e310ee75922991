/* The portable CPU inner loops: plain C, any head_dim, any machine. The AVX2
 * file is the fast path; this one is the fallback and a second reference. */
#include <math.h>

#include "kernels/distattn_impl.h"

static inline float load_elem(const void *base, size_t i, da_dtype t)
{
	switch (t) {
	case DA_F16:
		return da_f16_to_f32(((const uint16_t *)base)[i]);
	case DA_BF16:
		return da_bf16_to_f32(((const uint16_t *)base)[i]);
	default:
		return ((const float *)base)[i];
	}
}

static void score_portable(const void *K, const float *q, const da_dims *dm, uint32_t ntok,
			   float *S, ptrdiff_t next)
{
	(void)next; /* no prefetching here */
	for (uint32_t t = 0; t < ntok; t++) {
		for (uint32_t h = 0; h < dm->hkv; h++) {
			size_t row = ((size_t)t * dm->hkv + h) * dm->d;
			for (uint32_t g = 0; g < dm->group; g++) {
				uint32_t hq = h * dm->group + g;
				const float *qh = q + (size_t)hq * dm->d;
				float acc = 0.0f;
				for (uint32_t i = 0; i < dm->d; i++)
					acc += qh[i] * load_elem(K, row + i, dm->dtype);
				S[(size_t)hq * dm->bt + t] = acc;
			}
		}
	}
}

static void accum_portable(const void *V, const float *P, const da_dims *dm, uint32_t ntok,
			   float *o, ptrdiff_t next)
{
	(void)next;
	for (uint32_t t = 0; t < ntok; t++) {
		for (uint32_t h = 0; h < dm->hkv; h++) {
			size_t row = ((size_t)t * dm->hkv + h) * dm->d;
			for (uint32_t g = 0; g < dm->group; g++) {
				uint32_t hq = h * dm->group + g;
				float p = P[(size_t)hq * dm->bt + t];
				float *oh = o + (size_t)hq * dm->d;
				for (uint32_t i = 0; i < dm->d; i++)
					oh[i] += p * load_elem(V, row + i, dm->dtype);
			}
		}
	}
}

static void softmax_block_portable(float *S, uint32_t ntok, const da_dims *dm, float *m, float *l,
				   float *o)
{
	for (uint32_t h = 0; h < dm->hq; h++) {
		float *Sh = S + (size_t)h * dm->bt;
		float mx = -INFINITY;
		for (uint32_t t = 0; t < ntok; t++)
			mx = Sh[t] > mx ? Sh[t] : mx;
		float m_new = mx > m[h] ? mx : m[h];
		float alpha = expf(m[h] - m_new); /* 0 on the first block: m = -inf */
		float sum = 0.0f;
		for (uint32_t t = 0; t < ntok; t++) {
			Sh[t] = expf(Sh[t] - m_new);
			sum += Sh[t];
		}
		l[h] = l[h] * alpha + sum;
		if (alpha != 1.0f) {
			float *oh = o + (size_t)h * dm->d;
			for (uint32_t i = 0; i < dm->d; i++)
				oh[i] *= alpha;
		}
		m[h] = m_new;
	}
}

const da_isa da_isa_portable = {
	.name = "portable",
	.lanes = 1,
	.score = score_portable,
	.accum = accum_portable,
	.softmax_block = softmax_block_portable,
};
