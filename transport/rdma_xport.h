/* The RDMA backend of the data plane (xport_rdma_ops): GET_BLOCKS by one-sided
 * RDMA READ from the peer's registered arena into the caller's registered buffer,
 * PUT_BLOCKS by RDMA WRITE; ATTEND, APPEND_KV and PING as SEND/RECV messages on
 * the same queue pair (the same frames as xport_tcp_ops; one larger than a 128 KiB
 * message slot goes over the peer's TCP channel). docs/rdma.md explains the design,
 * docs/wire.md the control entries (arena byte with bit 7 set) it adds on that
 * channel and the frames over SEND/RECV.
 *
 * The verbs objects (device, registered regions) are the caller's and are passed
 * in an xport_rdma_cfg, which the generic xport_connect/xport_listen cannot carry:
 * those two entries of xport_rdma_ops return -EINVAL, use the functions below.
 * Everything else goes through the usual xport_* wrappers and keeps their
 * contract (transport.h): callbacks on the loop thread, exactly once. */
#ifndef KVMESH_TRANSPORT_RDMA_XPORT_H
#define KVMESH_TRANSPORT_RDMA_XPORT_H

#include "transport/rdma.h"
#include "transport/transport.h"

typedef struct xport_rdma_cfg {
	struct xrdma_dev *dev; /* open device (xrdma_dev_open); the caller's */
	struct xrdma_mr *mr;   /* client: every GET destination and PUT source lies
	                        * in it; server: the arena the blocks live in */
	uint64_t slot_bytes;   /* server: slot s of `arena` is at mr + s * slot_bytes */
	uint8_t arena;         /* server: the wire arena id served by RDMA (< 128) */
	uint32_t depth;        /* client: RDMA work requests in flight (default 64) */
} xport_rdma_cfg;

extern const struct xport_ops xport_rdma_ops;

/* Connects like xport_tcp_connect, then builds one RC queue pair to the server's
 * arena over that TCP channel. Returns 0 and a peer owned by the caller
 * (xport_close; before cfg->mr and cfg->dev are freed), -EINVAL for a bad cfg,
 * the TCP connect's errors, or the verbs' (the reason is logged). */
int xport_rdma_connect(xport_loop *l, const char *host, uint16_t port, const xport_opts *o,
		       const xport_rdma_cfg *cfg, xport_peer **out);

/* Listens like xport_tcp_listen with the caller's handlers h, and answers the RDMA
 * control entries itself: it creates a queue pair per client, and for each one-sided
 * request checks the block with h->get / h->put_prepare (generation and range, so
 * a stale handle is refused, not read) and holds the pin or transaction until the
 * client's READ or WRITE is done (h->unpin / h->put_commit). The block pointer the
 * handler returns must be mr + slot * slot_bytes + offset, else the entry fails
 * (-EFAULT). The server is the caller's (xport_server_close). */
int xport_rdma_listen(xport_loop *l, const char *host, uint16_t port, const xport_opts *o,
		      const xport_rdma_cfg *cfg, const xport_handlers *h, void *ctx, xport_server **out);

#endif
