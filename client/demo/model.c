/* The demo's synthetic transformer: see model.h. */
#include "client/demo/model.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* splitmix64: a small, well-mixed generator, so that weights depend only on
 * the seed. */
static uint64_t next_u64(uint64_t *s)
{
	uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

/* Uniform in [-a, a]. */
static void fill(float *w, size_t n, float a, uint64_t *s)
{
	for (size_t i = 0; i < n; i++)
		w[i] = a * (float)((double)(next_u64(s) >> 11) / 4503599627370496.0 - 1.0);
}

static float *alloc_fill(size_t n, float a, uint64_t *s)
{
	float *w = malloc(n * sizeof(float));
	if (w)
		fill(w, n, a, s);
	return w;
}

int demo_model_init(demo_model *m, uint32_t vocab, uint32_t width, uint32_t layers, uint32_t q_heads,
		    uint32_t kv_heads, uint32_t ffn, kvm_dtype dtype, uint64_t seed)
{
	memset(m, 0, sizeof(*m));
	if (!vocab || !width || !layers || !q_heads || !kv_heads || q_heads % kv_heads || width % q_heads ||
	    (width / q_heads) % 2)
		return -EINVAL;
	m->vocab = vocab, m->width = width, m->layers = layers, m->q_heads = q_heads;
	m->kv_heads = kv_heads, m->head_dim = width / q_heads, m->ffn = ffn, m->dtype = dtype;
	uint64_t s = seed;
	size_t W = width, D = m->head_dim, L = layers;
	/* Scales keep activations of order one through the layers (uniform
	 * [-a, a] has variance a^2/3). */
	float a_in = sqrtf(3.0f / (float)W), a_ffn = sqrtf(3.0f / (float)ffn);
	m->embed = alloc_fill((size_t)vocab * W, 1.0f, &s);
	m->wq = alloc_fill(L * q_heads * D * W, a_in, &s);
	m->wk = alloc_fill(L * kv_heads * D * W, a_in, &s);
	m->wv = alloc_fill(L * kv_heads * D * W, a_in, &s);
	m->wo = alloc_fill(L * W * q_heads * D, a_in * 0.5f, &s);
	m->w_up = alloc_fill(L * ffn * W, a_in, &s);
	m->w_down = alloc_fill(L * W * ffn, a_ffn * 0.5f, &s);
	m->norm_attn = alloc_fill(L * W, 0.1f, &s);
	m->norm_mlp = alloc_fill(L * W, 0.1f, &s);
	m->norm_out = alloc_fill(W, 0.1f, &s);
	m->unembed = alloc_fill((size_t)vocab * W, a_in, &s);
	if (!m->embed || !m->wq || !m->wk || !m->wv || !m->wo || !m->w_up || !m->w_down || !m->norm_attn ||
	    !m->norm_mlp || !m->norm_out || !m->unembed) {
		demo_model_free(m);
		return -ENOMEM;
	}
	/* Norm gains around one. */
	for (size_t i = 0; i < L * W; i++)
		m->norm_attn[i] += 1.0f, m->norm_mlp[i] += 1.0f;
	for (size_t i = 0; i < W; i++)
		m->norm_out[i] += 1.0f;
	return 0;
}

void demo_model_free(demo_model *m)
{
	free(m->embed), free(m->wq), free(m->wk), free(m->wv), free(m->wo);
	free(m->w_up), free(m->w_down), free(m->norm_attn), free(m->norm_mlp), free(m->norm_out);
	free(m->unembed);
	memset(m, 0, sizeof(*m));
}

size_t demo_row_bytes(const demo_model *m)
{
	return (size_t)m->kv_heads * m->head_dim * (m->dtype == KVM_F32 ? 4 : 2);
}

void demo_embed(const demo_model *m, uint32_t token, float *x)
{
	memcpy(x, m->embed + (size_t)(token % m->vocab) * m->width, m->width * sizeof(float));
}

static void rmsnorm(const float *x, const float *g, uint32_t n, float *out)
{
	double ss = 0;
	for (uint32_t i = 0; i < n; i++)
		ss += (double)x[i] * x[i];
	float r = (float)(1.0 / sqrt(ss / n + 1e-6));
	for (uint32_t i = 0; i < n; i++)
		out[i] = x[i] * r * g[i];
}

/* out[rows] = W[rows][cols] x[cols] */
static void matvec(const float *w, const float *x, uint32_t rows, uint32_t cols, float *out)
{
	for (uint32_t r = 0; r < rows; r++) {
		const float *row = w + (size_t)r * cols;
		float acc = 0;
		for (uint32_t c = 0; c < cols; c++)
			acc += row[c] * x[c];
		out[r] = acc;
	}
}

/* Rotary position embedding on each head of v (pairs of dimensions). */
static void rope(float *v, uint32_t heads, uint32_t dim, uint32_t pos)
{
	for (uint32_t h = 0; h < heads; h++)
		for (uint32_t i = 0; i < dim / 2; i++) {
			double theta = pos * pow(10000.0, -2.0 * i / dim);
			float c = (float)cos(theta), s = (float)sin(theta);
			float *p = v + (size_t)h * dim + 2 * i;
			float a = p[0], b = p[1];
			p[0] = a * c - b * s;
			p[1] = a * s + b * c;
		}
}

static uint16_t to_bf16(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
	u += 0x7fffu + ((u >> 16) & 1);         /* round to nearest even */
	return (uint16_t)(u >> 16);
}

static void store_row(kvm_dtype t, const float *v, uint32_t n, void *out)
{
	if (t == KVM_F32) {
		memcpy(out, v, n * sizeof(float));
	} else if (t == KVM_F16) {
		_Float16 *o = out;
		for (uint32_t i = 0; i < n; i++)
			o[i] = (_Float16)v[i];
	} else {
		uint16_t *o = out;
		for (uint32_t i = 0; i < n; i++)
			o[i] = to_bf16(v[i]);
	}
}

void demo_qkv(const demo_model *m, uint32_t layer, const float *x, uint32_t pos, float *q, void *k_row,
	      void *v_row)
{
	uint32_t W = m->width, D = m->head_dim, kvd = m->kv_heads * D;
	float h[W], k[kvd], v[kvd];
	rmsnorm(x, m->norm_attn + (size_t)layer * W, W, h);
	matvec(m->wq + (size_t)layer * m->q_heads * D * W, h, m->q_heads * D, W, q);
	matvec(m->wk + (size_t)layer * kvd * W, h, kvd, W, k);
	matvec(m->wv + (size_t)layer * kvd * W, h, kvd, W, v);
	rope(q, m->q_heads, D, pos);
	rope(k, m->kv_heads, D, pos);
	store_row(m->dtype, k, kvd, k_row);
	store_row(m->dtype, v, kvd, v_row);
}

void demo_finish_layer(const demo_model *m, uint32_t layer, float *x, const float *o)
{
	uint32_t W = m->width, F = m->ffn, QD = m->q_heads * m->head_dim;
	float t[W], h[W], up[F];
	matvec(m->wo + (size_t)layer * W * QD, o, W, QD, t);
	for (uint32_t i = 0; i < W; i++)
		x[i] += t[i];
	rmsnorm(x, m->norm_mlp + (size_t)layer * W, W, h);
	matvec(m->w_up + (size_t)layer * F * W, h, F, W, up);
	for (uint32_t i = 0; i < F; i++)
		up[i] = up[i] / (1.0f + expf(-up[i])); /* SiLU */
	matvec(m->w_down + (size_t)layer * W * F, up, W, F, t);
	for (uint32_t i = 0; i < W; i++)
		x[i] += t[i];
}

void demo_logits(const demo_model *m, const float *x, float *logits)
{
	float h[m->width];
	rmsnorm(x, m->norm_out, m->width, h);
	matvec(m->unembed, h, m->vocab, m->width, logits);
}

uint32_t demo_argmax(const float *v, uint32_t n)
{
	uint32_t best = 0;
	for (uint32_t i = 1; i < n; i++)
		if (v[i] > v[best])
			best = i;
	return best;
}
