/* A CPU emulation of the small CUDA subset kernels/distattn.cu uses, so that
 * the kernels' index arithmetic and synchronisation can be checked on a
 * machine without a GPU. Each CTA runs as blockDim.x std::threads; barriers
 * stand in for __syncthreads and warp shuffles (a shuffle that not all 32
 * lanes reach deadlocks here, as it is undefined on the GPU). Not a model of
 * memory ordering, timing or occupancy. */
#ifndef KVMESH_TESTS_GPU_EMU_CUDA_EMU_H
#define KVMESH_TESTS_GPU_EMU_CUDA_EMU_H

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

using std::isnan;
using std::min;

struct uint4 {
	unsigned x, y, z, w;
};
struct float4 {
	float x, y, z, w;
};
struct dim3 {
	unsigned x = 1, y = 1, z = 1;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d)
{
	return uint4{a, b, c, d};
}

inline thread_local dim3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

/* Shared state of the CTA being run. */
struct emu_cta {
	std::barrier<> bar;
	std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
	std::vector<float> slot_f;
	std::vector<int> slot_i;
	std::atomic<int> flag{0};
	std::vector<float4> smem;
	explicit emu_cta(unsigned threads, size_t smem_bytes)
		: bar((std::ptrdiff_t)threads), slot_f(threads), slot_i(threads),
		  smem((smem_bytes + 15) / 16)
	{
		for (unsigned w = 0; w < threads / 32; w++)
			warp_bar.emplace_back(new std::barrier<>(32));
		/* Garbage that shows: shared memory read before it is written. */
		float nan = std::nanf("");
		for (auto &v : smem)
			v = float4{nan, nan, nan, nan};
	}
};
inline thread_local emu_cta *emu_cur;

inline void __syncthreads()
{
	emu_cur->bar.arrive_and_wait();
}
inline int __syncthreads_or(int p)
{
	emu_cta &c = *emu_cur;
	c.bar.arrive_and_wait();
	if (threadIdx.x == 0)
		c.flag = 0;
	c.bar.arrive_and_wait();
	if (p)
		c.flag = 1;
	c.bar.arrive_and_wait();
	int r = c.flag;
	c.bar.arrive_and_wait();
	return r;
}
inline std::barrier<> &emu_warp_bar()
{
	return *emu_cur->warp_bar[threadIdx.x / 32];
}
inline void __syncwarp(unsigned mask = 0xffffffffu)
{
	assert(mask == 0xffffffffu);
	emu_warp_bar().arrive_and_wait();
}
inline float __shfl_xor_sync(unsigned mask, float v, int off)
{
	assert(mask == 0xffffffffu && off > 0 && off < 32);
	emu_cta &c = *emu_cur;
	const unsigned t = threadIdx.x, base = t & ~31u;
	c.slot_f[t] = v;
	emu_warp_bar().arrive_and_wait();
	float r = c.slot_f[base + ((t & 31u) ^ (unsigned)off)];
	emu_warp_bar().arrive_and_wait();
	return r;
}
inline int __any_sync(unsigned mask, int p)
{
	assert(mask == 0xffffffffu);
	emu_cta &c = *emu_cur;
	const unsigned t = threadIdx.x, base = t & ~31u;
	c.slot_i[t] = p != 0;
	emu_warp_bar().arrive_and_wait();
	int r = 0;
	for (unsigned l = 0; l < 32; l++)
		r |= c.slot_i[base + l];
	emu_warp_bar().arrive_and_wait();
	return r;
}

inline uint4 __ldg(const uint4 *p)
{
	if ((uintptr_t)p % 16 != 0) {
		fprintf(stderr, "emu: misaligned 16-byte load at %p\n", (const void *)p);
		abort();
	}
	return *p;
}
inline unsigned char __ldg(const unsigned char *p)
{
	return *p;
}
inline float __uint_as_float(unsigned u)
{
	float f;
	memcpy(&f, &u, 4);
	return f;
}
inline float __expf(float x)
{
	return expf(x);
}
struct __half {
	unsigned short b;
};
inline __half __ushort_as_half(unsigned short b)
{
	return __half{b};
}
inline float __half2float(__half h)
{
	const unsigned sign = (unsigned)(h.b & 0x8000u) << 16, exp = (h.b >> 10) & 0x1fu,
		       man = h.b & 0x3ffu;
	if (exp == 0x1f)
		return __uint_as_float(sign | 0x7f800000u | (man << 13));
	if (exp != 0)
		return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
	float f = ldexpf((float)man, -24);
	return sign ? -f : f;
}

/* Runtime. */
typedef int cudaError_t;
enum {
	cudaSuccess = 0,
	cudaErrorInvalidValue = 1,
	cudaErrorMemoryAllocation = 2,
	cudaErrorInsufficientDriver = 35,
	cudaErrorNoDevice = 100,
	cudaErrorInvalidDevice = 101,
};
enum { cudaDevAttrMultiProcessorCount = 16 };
typedef struct emu_stream *cudaStream_t;
inline int emu_n_sm = 2;
inline const char *cudaGetErrorName(cudaError_t)
{
	return "emu_error";
}
inline const char *cudaGetErrorString(cudaError_t)
{
	return "emulated error";
}
inline cudaError_t cudaGetDevice(int *d)
{
	*d = 0;
	return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int *v, int, int)
{
	*v = emu_n_sm;
	return cudaSuccess;
}
inline cudaError_t cudaMalloc(void **p, size_t n)
{
	*p = aligned_alloc(256, (n + 255) / 256 * 256);
	return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <class T> inline cudaError_t cudaMalloc(T **p, size_t n)
{
	return cudaMalloc(reinterpret_cast<void **>(p), n);
}
inline cudaError_t cudaFree(void *p)
{
	free(p);
	return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize()
{
	return cudaSuccess;
}
inline cudaError_t cudaGetLastError()
{
	return cudaSuccess;
}
template <class F> inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *n, F, int, size_t)
{
	*n = 1;
	return cudaSuccess;
}

inline size_t emu_max_smem_seen;

/* kernel<<<grid, block, smem, stream>>>(args...): CTAs one after another. */
template <class F, class... A>
void emu_launch(F f, unsigned grid, unsigned block, size_t smem, cudaStream_t, A... args)
{
	if (smem > 48 * 1024 || block % 32 != 0 || block > 1024 || grid == 0 || grid > INT32_MAX) {
		fprintf(stderr, "emu: bad launch grid=%u block=%u smem=%zu\n", grid, block, smem);
		abort();
	}
	emu_max_smem_seen = std::max(emu_max_smem_seen, smem);
	for (unsigned bx = 0; bx < grid; bx++) {
		emu_cta cta(block, smem);
		std::vector<std::thread> ts;
		for (unsigned t = 0; t < block; t++)
			ts.emplace_back([&, t] {
				threadIdx.x = t;
				blockIdx.x = bx;
				blockDim.x = block;
				gridDim.x = grid;
				emu_cur = &cta;
				f(args...);
				/* An exited thread no longer takes part, as on the GPU. */
				cta.warp_bar[t / 32]->arrive_and_drop();
				cta.bar.arrive_and_drop();
			});
		for (auto &th : ts)
			th.join();
	}
}
template <class F, class... A>
void emu_launch(F f, size_t grid, unsigned block, size_t smem, cudaStream_t s, A... args)
{
	emu_launch(f, (unsigned)grid, block, smem, s, args...);
}

#endif
