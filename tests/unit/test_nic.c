/* NIC discovery on this machine, and the transport choice between nodes. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "transport/nic.h"

TestSuite(nic, .timeout = 20);

Test(nic, discover_this_host)
{
	nic_report r;
	cr_assert_eq(nic_discover(&r), 0);
	cr_assert_gt(r.n, 0, "at least loopback");
	int lo = 0;
	for (uint32_t i = 0; i < r.n; i++) {
		const nic_info *n = &r.nics[i];
		if (n->is_loopback) {
			lo = 1;
			cr_assert(n->speed_gbps < 0, "loopback speed is unknown");
		}
		cr_assert(n->speed_gbps < 0 || n->speed_gbps > 0.0009);
		cr_assert(n->is_rdma || (n->link == 0 && n->rdma_dev[0] == 0));
	}
	cr_assert(lo);
	/* Two such hosts talk TCP unless both have RDMA. */
	enum xport_kind k = xport_choose(&r, &r, NULL, NULL);
	int any_rdma = 0;
	for (uint32_t i = 0; i < r.n; i++)
		any_rdma |= r.nics[i].is_rdma && r.nics[i].is_up;
	cr_assert_eq(k, any_rdma ? XPORT_KIND_RDMA : XPORT_KIND_TCP);
}

static nic_info mk(const char *name, int rdma, int link, double gbps, int up, uint8_t prefix)
{
	nic_info n;
	memset(&n, 0, sizeof n);
	snprintf(n.name, sizeof n.name, "%s", name);
	n.is_rdma = (uint8_t)rdma;
	n.link = (uint8_t)link;
	n.speed_gbps = gbps;
	n.is_up = (uint8_t)up;
	n.numa_node = -1;
	n.gid[0] = 0xfe;
	n.gid[7] = prefix;
	return n;
}

Test(nic, choose)
{
	nic_report a = {0}, b = {0};
	int li, ri;
	a.nics[a.n++] = mk("eth0", 0, 0, 25, 1, 0);
	b.nics[b.n++] = mk("eth0", 0, 0, 100, 1, 0);
	cr_assert_eq(xport_choose(&a, &b, &li, &ri), XPORT_KIND_TCP, "no RDMA anywhere");
	cr_assert(li == -1 && ri == -1);
	a.nics[a.n++] = mk("ib0", 1, NIC_LINK_INFINIBAND, 200, 1, 1);
	cr_assert_eq(xport_choose(&a, &b, NULL, NULL), XPORT_KIND_TCP, "RDMA on one side only");
	b.nics[b.n++] = mk("roce0", 1, NIC_LINK_ETHERNET, 100, 1, 0);
	cr_assert_eq(xport_choose(&a, &b, NULL, NULL), XPORT_KIND_TCP, "IB vs RoCE: no common fabric");
	b.nics[b.n++] = mk("ib0", 1, NIC_LINK_INFINIBAND, 200, 1, 2);
	cr_assert_eq(xport_choose(&a, &b, NULL, NULL), XPORT_KIND_TCP, "IB subnets differ");
	b.nics[b.n - 1].gid[7] = 1;
	cr_assert_eq(xport_choose(&a, &b, &li, &ri), XPORT_KIND_RDMA);
	cr_assert(li == 1 && ri == 2);
	b.nics[2].is_up = 0;
	cr_assert_eq(xport_choose(&a, &b, NULL, NULL), XPORT_KIND_TCP, "port down");
	/* RoCE on both: the fastest common pair wins. */
	nic_report c = {0}, d = {0};
	c.nics[c.n++] = mk("r25", 1, NIC_LINK_ETHERNET, 25, 1, 0);
	c.nics[c.n++] = mk("r100", 1, NIC_LINK_ETHERNET, 100, 1, 0);
	d.nics[d.n++] = mk("r100", 1, NIC_LINK_ETHERNET, 100, 1, 0);
	d.nics[d.n++] = mk("r50", 1, NIC_LINK_ETHERNET, 50, 1, 0);
	cr_assert_eq(xport_choose(&c, &d, &li, &ri), XPORT_KIND_RDMA);
	cr_assert(li == 1 && ri == 0, "li=%d ri=%d", li, ri);
	cr_assert_eq(xport_choose(&c, NULL, NULL, NULL), XPORT_KIND_TCP);
}
