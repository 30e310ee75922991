/* Runs the CUDA kernels of kernels/distattn.cu under the CPU emulation
 * (cuda_emu.h) against a naive double-precision softmax reference: the
 * kernels' indexing, splitting, GQA grouping, tails, odd shapes, misaligned
 * blocks, malformed lists and merges, on a machine without a GPU. Ends with
 * "N passed, N failed". Small shapes only: every CTA runs as real threads.
 * EMU_FILTER=substring runs a subset. */
#include "kernels/distattn.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>


static unsigned n_passed, n_failed;
static uint64_t rs = 0x243f6a8885a308d3ull;
static uint64_t rng()
{
	rs ^= rs >> 12;
	rs ^= rs << 25;
	rs ^= rs >> 27;
	return rs * 0x2545f4914f6cdd1dull;
}
static float rnd()
{
	return (float)((rng() >> 40) * (1.0 / (1ull << 23)) - 1.0);
}
static uint32_t below(uint32_t n)
{
	return n ? (uint32_t)(rng() % n) : 0;
}

static float h2f(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
	float f;
	if (exp == 0) {
		f = ldexpf((float)man, -24);
		return sign ? -f : f;
	}
	uint32_t bits = sign | ((exp + 112u) << 23) | (man << 13);
	memcpy(&f, &bits, 4);
	return f;
}
static uint16_t f2h(float f) /* truncating is enough: the reference reads back the same bits */
{
	uint32_t x;
	memcpy(&x, &f, 4);
	int32_t e = (int32_t)((x >> 23) & 0xff) - 112;
	if (e <= 0)
		return (uint16_t)((x >> 16) & 0x8000u);
	return (uint16_t)(((x >> 16) & 0x8000u) | ((uint32_t)e << 10) | ((x >> 13) & 0x3ffu));
}

static double elem(const unsigned char *p, da_dtype t, size_t i)
{
	if (t == DA_F32) {
		float f;
		memcpy(&f, p + 4 * i, 4);
		return f;
	}
	uint16_t h;
	memcpy(&h, p + 2 * i, 2);
	if (t == DA_F16)
		return h2f(h);
	uint32_t b = (uint32_t)h << 16;
	float f;
	memcpy(&f, &b, 4);
	return f;
}

static void report(bool ok, const char *name, double err)
{
	ok ? n_passed++ : n_failed++;
	printf("%s %s max_rel_err=%.3g\n", ok ? "ok  " : "FAIL", name, err);
	fflush(stdout);
}

struct pc {
	uint32_t hq, hkv, d, bt, layers, layer, nq, max_list, misalign, short_max;
	da_dtype t;
	std::vector<uint32_t> lens;
	bool null_block;
};

/* EMU_FILTER=substring runs only the cases whose names contain it. */
static bool wanted(const char *name)
{
	const char *f = getenv("EMU_FILTER");
	return !f || strstr(name, f);
}

static void run(const char *name, const pc &c)
{
	if (!wanted(name))
		return;
	da_shape s = {c.hq, c.hkv, c.d, c.bt, c.layer, c.t, 1.0f / sqrtf((float)c.d)};
	const size_t esz = da_dtype_size(c.t), bb = da_block_bytes(&s, c.layers);
	const size_t stride = (bb + c.misalign + 255) / 256 * 256;
	const uint32_t pool = 16;
	std::vector<unsigned char> blk(pool * stride + 256);
	unsigned char *base = blk.data() + (256 - (uintptr_t)blk.data() % 256) % 256;
	for (size_t i = 0; i + esz <= pool * stride; i += esz) {
		float v = rnd();
		if (esz == 4)
			memcpy(base + i, &v, 4);
		else {
			uint16_t h = c.t == DA_F16 ? f2h(v) : (uint16_t)(([&] { uint32_t x; memcpy(&x, &v, 4); return x; })() >> 16);
			memcpy(base + i, &h, 2);
		}
	}
	const uint32_t nq = c.nq;
	std::vector<uint32_t> start(nq + 1), ntok(nq);
	uint32_t maxb = 0;
	for (uint32_t i = 0; i < nq; i++) {
		uint32_t nb = c.lens.empty() ? below(c.max_list + 1) : c.lens[i];
		start[i + 1] = start[i] + nb;
		ntok[i] = nb ? (nb - 1) * c.bt + 1 + below(c.bt) : 0;
		maxb = std::max(maxb, nb);
	}
	std::vector<const void *> ptr(start[nq] + 1);
	for (uint32_t j = 0; j < start[nq]; j++)
		ptr[j] = base + below(pool) * stride + c.misalign;
	uint32_t null_q = UINT32_MAX;
	for (uint32_t i = 0; c.null_block && i < nq && null_q == UINT32_MAX; i++)
		if (start[i + 1] > start[i])
			null_q = i;
	std::vector<const void *> gptr = ptr;
	if (null_q != UINT32_MAX)
		gptr[start[null_q]] = nullptr;
	std::vector<float> q((size_t)nq * c.hq * c.d);
	for (auto &x : q)
		x = rnd();
	std::vector<float> o((size_t)nq * c.hq * c.d, NAN), lse((size_t)nq * c.hq, NAN);

	da_batch b = {nq, q.data(), gptr.data(), start.data(), ntok.data(), c.short_max ? c.short_max : maxb};
	da_cuda_ctx *ctx = nullptr;
	int rc = da_cuda_ctx_create(&ctx);
	if (rc == 0)
		rc = da_partial_cuda(ctx, &s, &b, o.data(), lse.data(), nullptr);
	da_cuda_ctx_destroy(ctx);
	if (rc != 0) {
		report(false, name, INFINITY);
		return;
	}

	const uint32_t G = c.hq / c.hkv;
	const size_t half = (size_t)c.bt * c.hkv * c.d; /* elements of one layer's K */
	double worst = 0.0;
	bool ok = true;
	for (uint32_t i = 0; i < nq; i++) {
		const bool want_nan = (c.short_max && start[i + 1] - start[i] > c.short_max) || i == null_q;
		for (uint32_t h = 0; h < c.hq; h++) {
			const size_t row = (size_t)i * c.hq + h;
			const float *og = &o[row * c.d];
			if (want_nan) {
				ok &= std::isnan(lse[row]) && std::isnan(og[0]);
				continue;
			}
			const uint32_t kvh = h / G;
			std::vector<double> sc(ntok[i]);
			double m = -INFINITY;
			for (uint32_t t = 0; t < ntok[i]; t++) {
				const unsigned char *bp = (const unsigned char *)ptr[start[i] + t / c.bt];
				size_t k0 = (size_t)c.layer * 2 * half + ((size_t)(t % c.bt) * c.hkv + kvh) * c.d;
				double a = 0;
				for (uint32_t e = 0; e < c.d; e++)
					a += (double)q[row * c.d + e] * elem(bp, c.t, k0 + e);
				sc[t] = a * s.scale;
				m = std::max(m, sc[t]);
			}
			if (ntok[i] == 0) {
				bool empty = std::isinf(lse[row]) && lse[row] < 0;
				for (uint32_t e = 0; e < c.d; e++)
					empty &= og[e] == 0.0f;
				ok &= empty;
				continue;
			}
			double L = 0;
			std::vector<double> ov(c.d, 0.0);
			for (uint32_t t = 0; t < ntok[i]; t++) {
				const unsigned char *bp = (const unsigned char *)ptr[start[i] + t / c.bt];
				size_t v0 = (size_t)c.layer * 2 * half + half + ((size_t)(t % c.bt) * c.hkv + kvh) * c.d;
				double w = exp(sc[t] - m);
				L += w;
				for (uint32_t e = 0; e < c.d; e++)
					ov[e] += w * elem(bp, c.t, v0 + e);
			}
			double mag = 1e-30, err = 0;
			for (uint32_t e = 0; e < c.d; e++) {
				mag = std::max(mag, fabs(ov[e] / L));
				if (!std::isfinite(og[e]))
					err = INFINITY;
				else
					err = std::max(err, fabs(og[e] - ov[e] / L));
			}
			worst = std::max(worst, err / mag);
			double lref = m + log(L);
			worst = std::max(worst, std::isfinite(lse[row]) ? fabs(lse[row] - lref) / std::max(1.0, fabs(lref)) : INFINITY);
		}
	}
	report(ok && worst <= 1e-5, name, worst);
}

static void run_merge(const char *name, uint32_t n, uint32_t rows, uint32_t d, bool in_place)
{
	if (!wanted(name))
		return;
	std::vector<std::vector<float>> po(n + 1, std::vector<float>((size_t)rows * d)),
		pl(n + 1, std::vector<float>(rows));
	for (uint32_t j = 0; j < n; j++)
		for (uint32_t r = 0; r < rows; r++) {
			bool empty = r % 5 == 2 || below(4) == 0;
			pl[j][r] = empty ? -INFINITY : 10 * rnd();
			for (uint32_t e = 0; e < d; e++)
				po[j][(size_t)r * d + e] = empty ? 0 : rnd();
		}
	std::vector<const float *> op(n + 1), lp(n + 1);
	for (uint32_t j = 0; j <= n; j++)
		op[j] = po[j].data(), lp[j] = pl[j].data();
	/* Reference before the (maybe in-place) merge. */
	std::vector<double> ro((size_t)rows * d), rl(rows);
	for (uint32_t r = 0; r < rows; r++) {
		double M = -INFINITY;
		for (uint32_t j = 0; j < n; j++)
			M = std::max(M, (double)pl[j][r]);
		if (M == -INFINITY) {
			rl[r] = -INFINITY;
			continue;
		}
		double W = 0;
		for (uint32_t j = 0; j < n; j++) {
			double w = exp(pl[j][r] - M);
			W += w;
			for (uint32_t e = 0; e < d; e++)
				ro[(size_t)r * d + e] += w * po[j][(size_t)r * d + e];
		}
		for (uint32_t e = 0; e < d; e++)
			ro[(size_t)r * d + e] /= W;
		rl[r] = M + log(W);
	}
	float *oo = in_place && n ? po[0].data() : po[n].data();
	float *lo = in_place && n ? pl[0].data() : pl[n].data();
	int rc = da_merge_cuda(n, rows, d, op.data(), lp.data(), oo, lo, nullptr);
	double worst = rc ? INFINITY : 0;
	for (uint32_t r = 0; r < rows && rc == 0; r++) {
		if (rl[r] == -INFINITY) {
			bool empty = std::isinf(lo[r]) && lo[r] < 0;
			for (uint32_t e = 0; e < d; e++)
				empty &= oo[(size_t)r * d + e] == 0.0f;
			if (!empty)
				worst = INFINITY;
			continue;
		}
		double mag = 1e-30, err = 0;
		for (uint32_t e = 0; e < d; e++) {
			mag = std::max(mag, fabs(ro[(size_t)r * d + e]));
			err = std::max(err, fabs(oo[(size_t)r * d + e] - ro[(size_t)r * d + e]));
		}
		if (!std::isfinite(err))
			err = INFINITY;
		worst = std::max(worst, err / mag);
		worst = std::max(worst, fabs(lo[r] - rl[r]) / std::max(1.0, fabs(rl[r])));
	}
	report(worst <= 1e-5, name, worst);
}

int main()
{
	char name[128];
	const da_dtype types[] = {DA_F32, DA_F16, DA_BF16};
	const char *tn[] = {"f32", "f16", "bf16"};
	const uint32_t heads[][2] = {{4, 4}, {4, 2}, {8, 2}, {5, 1}, {14, 2}, {8, 1}};
	const uint32_t dims[] = {64, 128};
	for (int ti = 0; ti < 3; ti++)
		for (uint32_t d : dims)
			for (auto &hh : heads) {
				pc c{hh[0], hh[1], d, 16, 2, 1, 3, 12, 0, 0, types[ti], {}, false};
				snprintf(name, sizeof(name), "emu/%s/d%u/hq%u-hkv%u", tn[ti], d, hh[0], hh[1]);
				run(name, c);
			}
	struct {
		const char *n;
		pc c;
	} sp[] = {
		{"emu/split/f16/mha", {2, 2, 128, 16, 1, 0, 1, 0, 0, 0, DA_F16, {70}, false}},
		{"emu/split/f32/gqa8-mixed", {8, 1, 64, 16, 1, 0, 4, 0, 0, 0, DA_F32, {0, 40, 3, 65}, false}},
		{"emu/split/bf16/bt7", {4, 2, 64, 7, 1, 0, 3, 0, 0, 0, DA_BF16, {150, 1, 90}, false}},
		{"emu/bt64/f16/gqa4", {8, 2, 128, 64, 1, 0, 3, 6, 0, 0, DA_F16, {}, false}},
		{"emu/bt1/f32", {2, 1, 64, 1, 1, 0, 2, 300, 0, 0, DA_F32, {}, false}},
		{"emu/d100/f16", {4, 2, 100, 16, 1, 0, 3, 8, 0, 0, DA_F16, {}, false}},
		{"emu/d36/f32/gqa8", {8, 1, 36, 16, 1, 0, 3, 8, 0, 0, DA_F32, {}, false}},
		{"emu/d8/f16", {2, 2, 8, 16, 1, 0, 3, 8, 0, 0, DA_F16, {}, false}},
		{"emu/d1/f32", {2, 1, 1, 16, 1, 0, 3, 8, 0, 0, DA_F32, {}, false}},
		{"emu/d256/bf16/gqa5", {5, 1, 256, 16, 1, 0, 2, 6, 0, 0, DA_BF16, {}, false}},
		{"emu/d512/f16/gqa3", {3, 1, 512, 16, 1, 0, 2, 4, 0, 0, DA_F16, {}, false}},
		{"emu/d512/f32/gqa2", {2, 1, 512, 16, 1, 0, 2, 4, 0, 0, DA_F32, {}, false}},
		{"emu/d320/f32", {4, 2, 320, 16, 1, 0, 2, 4, 0, 0, DA_F32, {}, false}},
		{"emu/d200/f32/gqa8", {8, 1, 200, 16, 1, 0, 2, 4, 0, 0, DA_F32, {}, false}},
		{"emu/mqa32/f16", {32, 1, 64, 16, 1, 0, 2, 4, 0, 0, DA_F16, {}, false}},
		{"emu/misalign2/f16", {4, 2, 128, 16, 1, 0, 3, 6, 2, 0, DA_F16, {}, false}},
		{"emu/misalign4/f32", {4, 4, 64, 16, 1, 0, 3, 6, 4, 0, DA_F32, {}, false}},
		{"emu/short_max", {4, 2, 64, 16, 1, 0, 4, 0, 0, 20, DA_F16, {0, 30, 5, 21}, false}},
		{"emu/short_max/split", {2, 1, 64, 16, 1, 0, 3, 0, 0, 40, DA_F32, {80, 39, 0}, false}},
		{"emu/null_block", {4, 2, 64, 16, 1, 0, 3, 0, 0, 0, DA_F32, {0, 3, 2}, true}},
		{"emu/null_block/split", {2, 2, 64, 16, 1, 0, 2, 0, 0, 0, DA_F16, {70, 5}, true}},
		{"emu/all_empty", {4, 2, 64, 16, 1, 0, 3, 0, 0, 0, DA_F16, {0, 0, 0}, false}},
	};
	for (auto &x : sp)
		run(x.n, x.c);
	run_merge("emu/merge/n0", 0, 7, 64, false);
	run_merge("emu/merge/n1", 1, 9, 64, true);
	run_merge("emu/merge/n3", 3, 17, 100, false);
	run_merge("emu/merge/n5-inplace", 5, 33, 128, true);
	run_merge("emu/merge/n40", 40, 5, 64, false);
	printf("%u passed, %u failed\n", n_passed, n_failed);
	return n_failed ? 1 : 0;
}
