#include "coordinator/links.h"

#include <stdio.h>
#include <string.h>

#define UNKNOWN_GBPS 10.0
#define TCP_SHARE 0.5

size_t kvm_nics_to_proto(const nic_report *r, Kvmesh__V1__Nic *n, size_t cap)
{
	size_t k = 0;
	for (uint32_t i = 0; i < r->n && i < NIC_MAX && k < cap; i++) {
		const nic_info *ni = &r->nics[i];
		if (ni->is_loopback)
			continue;
		Kvmesh__V1__Nic *p = &n[k++];
		kvmesh__v1__nic__init(p);
		p->name = (char *)ni->name;
		p->kind = !ni->is_rdma ? KVMESH__V1__LINK_KIND__LINK_TCP
			  : ni->link == NIC_LINK_INFINIBAND ? KVMESH__V1__LINK_KIND__LINK_RDMA_IB
							    : KVMESH__V1__LINK_KIND__LINK_RDMA_ROCE;
		p->speed_gbps = ni->speed_gbps > 0 ? (uint32_t)ni->speed_gbps : 0;
		p->up = ni->is_up;
		p->numa_node = ni->numa_node;
		if (ni->is_rdma) {
			p->rdma_device = (char *)ni->rdma_dev;
			p->rdma_port = ni->rdma_port;
			p->gid.data = (uint8_t *)ni->gid;
			p->gid.len = sizeof(ni->gid);
		}
	}
	return k;
}

void kvm_nics_from_proto(const Kvmesh__V1__Hardware *hw, nic_report *out)
{
	memset(out, 0, sizeof(*out));
	for (size_t i = 0; hw && i < hw->n_nics && out->n < NIC_MAX; i++) {
		const Kvmesh__V1__Nic *p = hw->nics[i];
		nic_info *ni = &out->nics[out->n++];
		snprintf(ni->name, sizeof(ni->name), "%s", p->name);
		ni->is_up = p->up;
		ni->is_rdma = p->kind == KVMESH__V1__LINK_KIND__LINK_RDMA_ROCE ||
			      p->kind == KVMESH__V1__LINK_KIND__LINK_RDMA_IB;
		ni->link = p->kind == KVMESH__V1__LINK_KIND__LINK_RDMA_IB     ? NIC_LINK_INFINIBAND
			   : p->kind == KVMESH__V1__LINK_KIND__LINK_RDMA_ROCE ? NIC_LINK_ETHERNET
									     : NIC_LINK_NONE;
		ni->speed_gbps = p->speed_gbps ? (double)p->speed_gbps : -1.0;
		ni->numa_node = p->numa_node;
		snprintf(ni->rdma_dev, sizeof(ni->rdma_dev), "%s", p->rdma_device);
		ni->rdma_port = (uint8_t)p->rdma_port;
		if (p->gid.len == sizeof(ni->gid))
			memcpy(ni->gid, p->gid.data, sizeof(ni->gid));
	}
}

static double speed_or_default(double s)
{
	return s > 0 ? s : UNKNOWN_GBPS;
}

/* The fastest up Ethernet NIC's speed (RoCE ports are Ethernet too; an
 * InfiniBand port is another network); 1 without any. */
static double best_tcp(const nic_report *r)
{
	double best = 0;
	for (uint32_t i = 0; i < r->n; i++)
		if (r->nics[i].is_up && !r->nics[i].is_loopback &&
		    r->nics[i].link != NIC_LINK_INFINIBAND) {
			double s = speed_or_default(r->nics[i].speed_gbps);
			best = s > best ? s : best;
		}
	return best > 0 ? best : 1.0;
}

double kvm_link_gbps(const Kvmesh__V1__Node *a, const Kvmesh__V1__Node *b)
{
	nic_report ra, rb;
	kvm_nics_from_proto(a->hardware, &ra);
	kvm_nics_from_proto(b->hardware, &rb);
	int li, ri;
	if (xport_choose(&ra, &rb, &li, &ri) == XPORT_KIND_RDMA) {
		double x = speed_or_default(ra.nics[li].speed_gbps);
		double y = speed_or_default(rb.nics[ri].speed_gbps);
		return x < y ? x : y;
	}
	double x = best_tcp(&ra), y = best_tcp(&rb);
	return TCP_SHARE * (x < y ? x : y);
}
