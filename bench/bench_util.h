/* Small helpers the cluster benchmarks share: a monotonic clock, numeric
 * settings from the environment, and the median of repeated runs. */
#ifndef KVMESH_BENCH_BENCH_UTIL_H
#define KVMESH_BENCH_BENCH_UTIL_H

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static inline double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* $name as a number, or def when unset or empty. */
static inline uint64_t env_u64(const char *name, uint64_t def)
{
	const char *v = getenv(name);
	return v && *v ? strtoull(v, NULL, 10) : def;
}

static inline int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* The p-th percentile (0..100) of n sorted values, by nearest rank. */
static inline double percentile(const double *sorted, size_t n, int p)
{
	if (n == 0)
		return 0;
	size_t i = n * (size_t)p / 100;
	return sorted[i < n ? i : n - 1];
}

/* Sorts v and returns its median (the mean of the middle two for even n). */
static inline double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(double), cmp_double);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#endif
