/* GPU discovery for the node agent, at run time: the CUDA driver library is
 * loaded with dlopen, so that no binary needs CUDA to build or to run, and a
 * node without a driver simply has no GPUs.
 *
 * The library is "libcuda.so.1" (the driver's soname), or the path in the
 * environment variable KVMESH_LIBCUDA (another driver build, or the tests'
 * fake: tests/fake/libcuda.c). */
#ifndef KVMESH_NODE_AGENT_GPUS_H
#define KVMESH_NODE_AGENT_GPUS_H

#include <stddef.h>
#include <stdint.h>

#include "proto/kvmesh.pb-c.h"

#define GPU_MAX 64

typedef struct gpu_info {
	uint32_t index;        /* CUDA device ordinal */
	char name[96];
	uint64_t memory_bytes;
	uint32_t cc_major, cc_minor; /* compute capability */
	char pci_bus_id[32];   /* "0000:19:00.0"; empty when the driver did not say */
} gpu_info;

typedef struct gpu_report {
	size_t n;
	gpu_info gpus[GPU_MAX];
	char why_none[160]; /* when n == 0: no library, a missing symbol, cuInit's error */
} gpu_report;

/* Fills *r with the GPUs the driver reports (n = 0 and why_none set when
 * there is no driver or it fails). Calls cuInit in this process; the library
 * stays loaded (unloading a driver that was initialised is not safe).
 * Returns 0, or -ENOENT when no GPU could be listed (r->why_none says why). */
int gpu_discover(gpu_report *r);

/* Fills out[0..cap) from r (strings point into r, which must outlive them);
 * returns how many. */
size_t gpus_to_proto(const gpu_report *r, Kvmesh__V1__Gpu *out, size_t cap);

#endif
