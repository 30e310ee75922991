/* NICs in the control API and the link bandwidth between two nodes, which
 * ranks creditors in the KV ledger (Holmes: keep heavy traffic inside one
 * RDMA fabric; TCP-only pairs rank below any RDMA pair). */
#ifndef KVMESH_COORDINATOR_LINKS_H
#define KVMESH_COORDINATOR_LINKS_H

#include "proto/kvmesh.pb-c.h"
#include "transport/nic.h"

/* Fills n (at most cap) proto NICs from a discovery report; the strings
 * point into `r`, which must outlive them. Returns how many were filled. */
size_t kvm_nics_to_proto(const nic_report *r, Kvmesh__V1__Nic *n, size_t cap);

/* The reverse, for a registered node's NIC list. */
void kvm_nics_from_proto(const Kvmesh__V1__Hardware *hw, nic_report *out);

/* Effective bandwidth in Gbit/s between two nodes as the data plane will use
 * it: over RDMA when both share a fabric (the slower of the chosen ports),
 * else over TCP at half the slower Ethernet NIC's speed (kernel copies and
 * one stream a connection; loopback, down and InfiniBand NICs do not count). Unknown speeds count
 * as 10 Gbit/s; a node without NICs as 1. */
double kvm_link_gbps(const Kvmesh__V1__Node *a, const Kvmesh__V1__Node *b);

#endif
