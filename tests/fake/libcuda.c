/* A fake CUDA driver for the agent's GPU discovery tests (node-agent/gpus.c):
 * the driver API calls the agent uses, answering for two fixed GPUs. Built
 * as build/tests/fake/libcuda.so.1; an agent loads it when started with
 * KVMESH_LIBCUDA=<that path>. FAKE_CUDA_INIT_ERROR=N makes cuInit fail
 * with N, as a driver without a usable device does (100,
 * CUDA_ERROR_NO_DEVICE). */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

static const struct {
	const char *name, *pci;
	size_t mem;
	int major, minor;
} devs[] = {
	{"NVIDIA H200", "0000:19:00.0", 150754820096ull, 9, 0},
	{"NVIDIA A100-SXM4-80GB", "0000:3B:00.0", 85899345920ull, 8, 0},
};
#define N_DEVS ((int)(sizeof(devs) / sizeof(devs[0])))
static int inited;

int cuInit(unsigned flags)
{
	const char *e = getenv("FAKE_CUDA_INIT_ERROR");
	if (flags != 0)
		return 1; /* CUDA_ERROR_INVALID_VALUE */
	if (e && atoi(e))
		return atoi(e);
	inited = 1;
	return 0;
}

int cuGetErrorName(int rc, const char **s)
{
	*s = rc == 100 ? "CUDA_ERROR_NO_DEVICE" : rc == 3 ? "CUDA_ERROR_NOT_INITIALIZED"
							  : "CUDA_ERROR_UNKNOWN";
	return 0;
}

int cuDeviceGetCount(int *n)
{
	if (!inited)
		return 3; /* CUDA_ERROR_NOT_INITIALIZED */
	*n = N_DEVS;
	return 0;
}

int cuDeviceGet(int *dev, int ordinal)
{
	if (!inited)
		return 3;
	if (ordinal < 0 || ordinal >= N_DEVS)
		return 101; /* CUDA_ERROR_INVALID_DEVICE */
	*dev = ordinal;
	return 0;
}

static int bad(int dev)
{
	return !inited || dev < 0 || dev >= N_DEVS;
}

int cuDeviceGetName(char *name, int len, int dev)
{
	if (bad(dev))
		return 101;
	snprintf(name, (size_t)len, "%s", devs[dev].name);
	return 0;
}

int cuDeviceTotalMem_v2(size_t *bytes, int dev)
{
	if (bad(dev))
		return 101;
	*bytes = devs[dev].mem;
	return 0;
}

int cuDeviceGetPCIBusId(char *id, int len, int dev)
{
	if (bad(dev))
		return 101;
	snprintf(id, (size_t)len, "%s", devs[dev].pci);
	return 0;
}

int cuDeviceGetAttribute(int *v, int attr, int dev)
{
	if (bad(dev))
		return 101;
	if (attr == 75)
		*v = devs[dev].major;
	else if (attr == 76)
		*v = devs[dev].minor;
	else
		return 1;
	return 0;
}
