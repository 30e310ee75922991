/* GPU discovery through the CUDA driver API, loaded at run time (gpus.h).
 * Only the driver API is used (not the runtime, libcudart): it is what the
 * driver package installs, and it answers without creating a context. */
#include "node-agent/gpus.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The few driver API types and constants used, from cuda.h (stable ABI). */
typedef int CUresult;
typedef int CUdevice;
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR 75
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR 76

typedef struct cuda_api {
	CUresult (*init)(unsigned flags);
	CUresult (*count)(int *n);
	CUresult (*get)(CUdevice *dev, int ordinal);
	CUresult (*name)(char *name, int len, CUdevice dev);
	CUresult (*total_mem)(size_t *bytes, CUdevice dev);
	CUresult (*pci_bus_id)(char *id, int len, CUdevice dev);
	CUresult (*attribute)(int *v, int attr, CUdevice dev);
	CUresult (*error_name)(CUresult rc, const char **s); /* optional */
} cuda_api;

/* The driver's name for rc ("CUDA_ERROR_NO_DEVICE"), or "". */
static const char *err_name(const cuda_api *api, CUresult rc)
{
	const char *s = NULL;
	if (api->error_name && api->error_name(rc, &s) == 0 && s)
		return s;
	return "";
}

int gpu_discover(gpu_report *r)
{
	memset(r, 0, sizeof(*r));
	const char *lib = getenv("KVMESH_LIBCUDA");
	if (!lib || !lib[0])
		lib = "libcuda.so.1";
	void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		const char *e = dlerror();
		snprintf(r->why_none, sizeof(r->why_none), "no CUDA driver: %s", e ? e : lib);
		return -ENOENT;
	}
	cuda_api api;
	struct {
		void **fn;
		const char *sym;
	} syms[] = {
		{(void **)&api.init, "cuInit"},
		{(void **)&api.count, "cuDeviceGetCount"},
		{(void **)&api.get, "cuDeviceGet"},
		{(void **)&api.name, "cuDeviceGetName"},
		{(void **)&api.total_mem, "cuDeviceTotalMem_v2"},
		{(void **)&api.pci_bus_id, "cuDeviceGetPCIBusId"},
		{(void **)&api.attribute, "cuDeviceGetAttribute"},
	};
	for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++)
		if (!(*syms[i].fn = dlsym(h, syms[i].sym))) {
			snprintf(r->why_none, sizeof(r->why_none), "%s lacks %s", lib, syms[i].sym);
			dlclose(h); /* not initialised: safe to unload */
			return -ENOENT;
		}
	*(void **)&api.error_name = dlsym(h, "cuGetErrorName");

	const char *step = "cuInit";
	CUresult rc = api.init(0);
	int n = 0;
	if (rc == 0) {
		step = "cuDeviceGetCount";
		rc = api.count(&n);
	}
	if (rc != 0) {
		snprintf(r->why_none, sizeof(r->why_none), "%s failed: error %d %s", step, rc,
			 err_name(&api, rc));
		return -ENOENT; /* the library stays loaded: cuInit may have run */
	}
	for (int i = 0; i < n && r->n < GPU_MAX; i++) {
		CUdevice dev;
		gpu_info *g = &r->gpus[r->n];
		if (api.get(&dev, i) != 0)
			continue;
		g->index = (uint32_t)i;
		if (api.name(g->name, (int)sizeof(g->name), dev) != 0)
			snprintf(g->name, sizeof(g->name), "GPU %d", i);
		g->name[sizeof(g->name) - 1] = '\0';
		size_t bytes = 0;
		if (api.total_mem(&bytes, dev) == 0)
			g->memory_bytes = bytes;
		if (api.pci_bus_id(g->pci_bus_id, (int)sizeof(g->pci_bus_id), dev) != 0)
			g->pci_bus_id[0] = '\0';
		g->pci_bus_id[sizeof(g->pci_bus_id) - 1] = '\0';
		int major = 0, minor = 0;
		api.attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
		api.attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
		g->cc_major = major > 0 ? (uint32_t)major : 0;
		g->cc_minor = minor > 0 ? (uint32_t)minor : 0;
		r->n++;
	}
	if (r->n == 0) {
		snprintf(r->why_none, sizeof(r->why_none), "the CUDA driver reports %d devices", n);
		return -ENOENT;
	}
	return 0;
}

size_t gpus_to_proto(const gpu_report *r, Kvmesh__V1__Gpu *out, size_t cap)
{
	size_t k = 0;
	for (; k < r->n && k < cap; k++) {
		const gpu_info *g = &r->gpus[k];
		kvmesh__v1__gpu__init(&out[k]);
		out[k].index = g->index;
		out[k].name = (char *)g->name;
		out[k].memory_bytes = g->memory_bytes;
		out[k].compute_major = g->cc_major;
		out[k].compute_minor = g->cc_minor;
		out[k].pci_bus_id = (char *)g->pci_bus_id;
	}
	return k;
}
