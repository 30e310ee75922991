/* NIC discovery from /sys/class/net and libibverbs; see nic.h. */
#include "transport/nic.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <infiniband/verbs.h>

#include "common/log.h"

static int read_line(const char *path, char *buf, size_t n)
{
	FILE *f = fopen(path, "r");
	if (!f)
		return -errno;
	char *r = fgets(buf, (int)n, f);
	fclose(f);
	if (!r)
		return -EIO;
	buf[strcspn(buf, "\n")] = 0;
	return 0;
}

static long read_long(const char *path, long dflt)
{
	char b[64];
	if (read_line(path, b, sizeof b))
		return dflt;
	char *end;
	long v = strtol(b, &end, 10);
	return end == b ? dflt : v;
}

static nic_info *find_nic(nic_report *r, const char *name)
{
	for (uint32_t i = 0; i < r->n; i++)
		if (strcmp(r->nics[i].name, name) == 0)
			return &r->nics[i];
	return NULL;
}

/* The netdev of a verbs device port: the GID table's ndevs/0 (RoCE, rxe), else
 * the PCI device's only net/ entry. */
static int rdma_netdev(const char *dev, int port, char *out, size_t n)
{
	char p[256];
	snprintf(p, sizeof p, "/sys/class/infiniband/%s/ports/%d/gid_attrs/ndevs/0", dev, port);
	if (read_line(p, out, n) == 0 && out[0])
		return 0;
	snprintf(p, sizeof p, "/sys/class/infiniband/%s/device/net", dev);
	DIR *d = opendir(p);
	if (!d)
		return -ENOENT;
	struct dirent *e;
	int rc = -ENOENT;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		size_t len = strlen(e->d_name);
		if (len >= n)
			continue;
		memcpy(out, e->d_name, len + 1);
		rc = 0;
		break;
	}
	closedir(d);
	return rc;
}

static void discover_rdma(nic_report *r)
{
	int n = 0;
	struct ibv_device **list = ibv_get_device_list(&n);
	if (!list)
		return;
	for (int i = 0; i < n; i++) {
		const char *dev = ibv_get_device_name(list[i]);
		struct ibv_context *ctx = ibv_open_device(list[i]);
		if (!ctx)
			continue;
		struct ibv_device_attr da;
		if (ibv_query_device(ctx, &da) == 0) {
			for (int port = 1; port <= da.phys_port_cnt; port++) {
				struct ibv_port_attr pa;
				if (ibv_query_port(ctx, (uint8_t)port, &pa))
					continue;
				char nd[64] = "";
				nic_info *ni = NULL;
				if (rdma_netdev(dev, port, nd, sizeof nd) == 0)
					ni = find_nic(r, nd);
				if (!ni && r->n < NIC_MAX) {
					/* An IB port without a netdev (no IPoIB): list it by itself. */
					ni = &r->nics[r->n++];
					memset(ni, 0, sizeof *ni);
					snprintf(ni->name, sizeof ni->name, "%s/%d", dev, port);
					ni->speed_gbps = -1;
					ni->numa_node = -1;
					ni->is_up = pa.state == IBV_PORT_ACTIVE;
				}
				if (!ni || ni->is_rdma)
					continue;
				ni->is_rdma = 1;
				ni->link = pa.link_layer == IBV_LINK_LAYER_INFINIBAND ? NIC_LINK_INFINIBAND : NIC_LINK_ETHERNET;
				snprintf(ni->rdma_dev, sizeof ni->rdma_dev, "%s", dev);
				ni->rdma_port = (uint8_t)port;
				union ibv_gid gid;
				if (ibv_query_gid(ctx, (uint8_t)port, 0, &gid) == 0)
					memcpy(ni->gid, gid.raw, 16);
				if (pa.state != IBV_PORT_ACTIVE)
					ni->is_up = 0;
			}
		}
		ibv_close_device(ctx);
	}
	ibv_free_device_list(list);
}

int nic_discover(nic_report *r)
{
	memset(r, 0, sizeof *r);
	DIR *d = opendir("/sys/class/net");
	if (!d)
		return -errno;
	struct dirent *e;
	char p[512], b[64];
	while ((e = readdir(d)) && r->n < NIC_MAX) {
		if (e->d_name[0] == '.' || strlen(e->d_name) >= sizeof r->nics[0].name)
			continue;
		nic_info *ni = &r->nics[r->n++];
		snprintf(ni->name, sizeof ni->name, "%s", e->d_name);
		snprintf(p, sizeof p, "/sys/class/net/%s/type", e->d_name);
		ni->is_loopback = read_long(p, 0) == 772; /* ARPHRD_LOOPBACK */
		snprintf(p, sizeof p, "/sys/class/net/%s/operstate", e->d_name);
		if (read_line(p, b, sizeof b) == 0)
			ni->is_up = strcmp(b, "up") == 0 || (ni->is_loopback && strcmp(b, "unknown") == 0);
		snprintf(p, sizeof p, "/sys/class/net/%s/speed", e->d_name);
		long mbps = read_long(p, -1); /* EINVAL on virtual NICs, -1 when unknown */
		ni->speed_gbps = mbps > 0 ? (double)mbps / 1000.0 : -1.0;
		snprintf(p, sizeof p, "/sys/class/net/%s/device/numa_node", e->d_name);
		ni->numa_node = (int32_t)read_long(p, -1);
		snprintf(p, sizeof p, "/sys/class/net/%s/mtu", e->d_name);
		ni->mtu = (uint32_t)read_long(p, 0);
	}
	closedir(d);
	discover_rdma(r);
	for (uint32_t i = 0; i < r->n; i++) {
		nic_info *ni = &r->nics[i];
		kvm_log(KVM_LOG_DEBUG, "nic_found", "name=%s up=%u rdma=%u link=%u speed_gbps=%.1f numa=%d dev=%s port=%u",
			ni->name, ni->is_up, ni->is_rdma, ni->link, ni->speed_gbps, ni->numa_node,
			ni->rdma_dev[0] ? ni->rdma_dev : "-", ni->rdma_port);
	}
	return 0;
}

/* Same fabric: same link layer; InfiniBand ports also need the same subnet
 * prefix (the GID's first 8 bytes). */
static int same_fabric(const nic_info *a, const nic_info *b)
{
	if (a->link != b->link || a->link == NIC_LINK_NONE)
		return 0;
	if (a->link == NIC_LINK_INFINIBAND)
		return memcmp(a->gid, b->gid, 8) == 0;
	return 1;
}

enum xport_kind xport_choose(const nic_report *l, const nic_report *r, int *li, int *ri)
{
	int bl = -1, br = -1;
	double best = -2;
	for (uint32_t i = 0; l && r && i < l->n && i < NIC_MAX; i++) {
		const nic_info *a = &l->nics[i];
		if (!a->is_rdma || !a->is_up)
			continue;
		for (uint32_t j = 0; j < r->n && j < NIC_MAX; j++) {
			const nic_info *b = &r->nics[j];
			if (!b->is_rdma || !b->is_up || !same_fabric(a, b))
				continue;
			double s = a->speed_gbps < b->speed_gbps ? a->speed_gbps : b->speed_gbps;
			if (s > best) {
				best = s;
				bl = (int)i;
				br = (int)j;
			}
		}
	}
	if (li)
		*li = bl;
	if (ri)
		*ri = br;
	return bl >= 0 ? XPORT_KIND_RDMA : XPORT_KIND_TCP;
}
