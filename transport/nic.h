/* NIC discovery and the choice of transport for a pair of nodes.
 *
 * nic_discover lists every network interface of this host: kind (loopback,
 * Ethernet, RDMA over InfiniBand or RoCE), speed, state and NUMA node from
 * /sys/class/net, and for RDMA-capable ones the verbs device, port and GID
 * from libibverbs (a device's netdev comes from its GID table's ndevs entry
 * or its PCI device's net/ folder). The agent sends the nic_report to the
 * coordinator as it is (the coordinator's protobuf mirrors its fields).
 *
 * xport_choose picks RDMA when both nodes have an up RDMA port on a common
 * fabric (same link layer; for InfiniBand also the same subnet prefix), TCP
 * otherwise. Holmes's rule: bandwidth-heavy traffic stays inside one fabric. */
#ifndef KVMESH_TRANSPORT_NIC_H
#define KVMESH_TRANSPORT_NIC_H

#include <stdint.h>

#define NIC_MAX 32

enum nic_link { NIC_LINK_NONE = 0, NIC_LINK_ETHERNET = 1, NIC_LINK_INFINIBAND = 2 };

typedef struct nic_info {
	char name[32];       /* netdev name ("eth0"); the verbs device's for IB without netdev */
	uint8_t is_loopback;
	uint8_t is_up;       /* operstate "up" (or "unknown" on loopback) */
	uint8_t is_rdma;     /* has a verbs device and port */
	uint8_t link;        /* enum nic_link of the RDMA port (NONE if not RDMA) */
	double speed_gbps;   /* < 0: unknown (virtual NICs report -1) */
	int32_t numa_node;   /* -1: unknown */
	uint32_t mtu;
	/* RDMA only */
	char rdma_dev[64];   /* "mlx5_0", "rxe0" */
	uint8_t rdma_port;   /* 1-based */
	uint8_t gid[16];     /* GID index 0 (RoCE: the port's first GID) */
} nic_info;

typedef struct nic_report {
	uint32_t n;
	nic_info nics[NIC_MAX];
} nic_report;

/* Fills *out. Without RDMA devices (or libibverbs providers) every NIC comes
 * back with is_rdma = 0; that is not an error. Returns 0 or -errno (/sys
 * unreadable). */
int nic_discover(nic_report *out);

enum xport_kind { XPORT_KIND_TCP = 0, XPORT_KIND_RDMA = 1 };

/* Chooses the transport between two nodes. With RDMA, *li and *ri (may be
 * NULL) get the indexes of the chosen NICs (the fastest common pair); with
 * TCP they get -1. */
enum xport_kind xport_choose(const nic_report *local, const nic_report *remote, int *li, int *ri);

#endif
