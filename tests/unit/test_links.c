/* Link bandwidth between nodes from their NICs, as the ledger ranks
 * creditors: RDMA on a shared fabric first, TCP at a discount otherwise. */
#include <criterion/criterion.h>
#include <string.h>

#include "coordinator/links.h"

static Kvmesh__V1__Nic nic(const char *name, Kvmesh__V1__LinkKind kind, uint32_t gbps, int up)
{
	Kvmesh__V1__Nic n = KVMESH__V1__NIC__INIT;
	n.name = (char *)name;
	n.kind = kind;
	n.speed_gbps = gbps;
	n.up = up;
	n.rdma_device = kind == KVMESH__V1__LINK_KIND__LINK_TCP ? "" : "mlx5_0";
	n.rdma_port = 1;
	return n;
}

typedef struct {
	Kvmesh__V1__Node node;
	Kvmesh__V1__Hardware hw;
	Kvmesh__V1__Nic nics[4];
	Kvmesh__V1__Nic *ptrs[4];
} test_node;

static void make(test_node *t, size_t n, const Kvmesh__V1__Nic *nics)
{
	kvmesh__v1__node__init(&t->node);
	kvmesh__v1__hardware__init(&t->hw);
	for (size_t i = 0; i < n; i++) {
		t->nics[i] = nics[i];
		t->ptrs[i] = &t->nics[i];
	}
	t->hw.n_nics = n;
	t->hw.nics = t->ptrs;
	t->node.hardware = &t->hw;
}

Test(links, rdma_on_a_shared_fabric_beats_tcp)
{
	test_node a, b, c, d;
	Kvmesh__V1__Nic roce100[] = {nic("eth0", KVMESH__V1__LINK_KIND__LINK_TCP, 25, 1),
				     nic("ens1", KVMESH__V1__LINK_KIND__LINK_RDMA_ROCE, 100, 1)};
	Kvmesh__V1__Nic roce200[] = {nic("ens1", KVMESH__V1__LINK_KIND__LINK_RDMA_ROCE, 200, 1)};
	Kvmesh__V1__Nic ib[] = {nic("ib0", KVMESH__V1__LINK_KIND__LINK_RDMA_IB, 200, 1),
				nic("eth0", KVMESH__V1__LINK_KIND__LINK_TCP, 50, 1)};
	Kvmesh__V1__Nic tcp[] = {nic("eth0", KVMESH__V1__LINK_KIND__LINK_TCP, 25, 1)};
	make(&a, 2, roce100);
	make(&b, 1, roce200);
	make(&c, 2, ib);
	make(&d, 1, tcp);
	/* RoCE to RoCE: the slower port. */
	cr_assert_float_eq(kvm_link_gbps(&a.node, &b.node), 100.0, 1e-9);
	/* RoCE to InfiniBand: no common fabric, so TCP: half the slower NIC. */
	cr_assert_float_eq(kvm_link_gbps(&a.node, &c.node), 25.0, 1e-9);
	cr_assert_float_eq(kvm_link_gbps(&a.node, &d.node), 12.5, 1e-9);
	cr_assert_float_eq(kvm_link_gbps(&d.node, &a.node), 12.5, 1e-9); /* symmetric */
	cr_assert(kvm_link_gbps(&a.node, &b.node) > kvm_link_gbps(&a.node, &d.node));
}

Test(links, unknown_down_and_missing_nics)
{
	test_node a, b, none;
	Kvmesh__V1__Nic virt[] = {nic("eth0", KVMESH__V1__LINK_KIND__LINK_TCP, 0, 1)};
	Kvmesh__V1__Nic down[] = {nic("ens1", KVMESH__V1__LINK_KIND__LINK_RDMA_ROCE, 100, 0),
				  nic("eth0", KVMESH__V1__LINK_KIND__LINK_TCP, 0, 1)};
	make(&a, 1, virt);
	make(&b, 2, down);
	make(&none, 0, NULL);
	/* Unknown speeds count as 10 Gbit/s; a down RDMA port is not used. */
	cr_assert_float_eq(kvm_link_gbps(&a.node, &b.node), 5.0, 1e-9);
	cr_assert_float_eq(kvm_link_gbps(&a.node, &none.node), 0.5, 1e-9);
}

Test(links, discovery_round_trips_through_the_proto)
{
	nic_report r, back;
	cr_assert_eq(nic_discover(&r), 0);
	Kvmesh__V1__Nic n[NIC_MAX], *p[NIC_MAX];
	Kvmesh__V1__Hardware hw = KVMESH__V1__HARDWARE__INIT;
	hw.n_nics = kvm_nics_to_proto(&r, n, NIC_MAX);
	for (size_t i = 0; i < hw.n_nics; i++)
		p[i] = &n[i];
	hw.nics = p;
	kvm_nics_from_proto(&hw, &back);
	cr_assert_eq(back.n, hw.n_nics);
	for (uint32_t i = 0; i < back.n; i++)
		cr_assert_str_eq(back.nics[i].name, n[i].name);
}
