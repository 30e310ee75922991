/* The verbs layer of the RDMA transport; see transport/rdma.h for the contracts. */
#include "transport/rdma.h"

#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <infiniband/verbs.h>

/* Port 1: rxe and every RoCE NIC expose one port per device; IB HCAs with two ports
 * show up as two ports of one device, and the transport uses the first. */
#define XRDMA_PORT 1
/* Local ACK timeout 4.096 us * 2^16 = 268 ms, 6 retries: a vanished peer is detected
 * in about 2 s. Lower values misfire under emulation (rxe in a TCG guest can take
 * tens of ms to answer); higher ones make a dead peer hang requests for minutes.
 * Not 7: the IB spec makes 7 mean seven retries, but rxe treats retry_cnt 7 as
 * "retry forever", and a dead peer then hangs every request (seen on 6.1). */
#define XRDMA_TIMEOUT 16
#define XRDMA_RETRY   6
/* Receiver-not-ready retries: finite (7 would mean forever), so a SEND to a peer that
 * never posts a receive fails with -ECONNREFUSED instead of hanging. */
#define XRDMA_RNR_RETRY 6
/* Smallest RNR NAK timer that still makes 6 retries last long enough (12: 0.64 ms). */
#define XRDMA_MIN_RNR_TIMER 12

struct xrdma_dev {
	struct ibv_context *ctx;
	struct ibv_pd *pd;
	struct ibv_port_attr port;
	union ibv_gid gid;
	int gid_index;
	bool roce;
	int max_rd_atomic; /* outstanding RDMA READs the device allows per QP */
	char err[XRDMA_ERRLEN];
};

struct xrdma_mr {
	struct xrdma_dev *dev;
	struct ibv_mr *mr;
};

/* An outstanding work request: completions with an error carry no valid opcode, so
 * the op is remembered here, per queue, in posting order (RC completes in order). */
struct xrdma_pending {
	uint64_t wr_id;
	enum xrdma_op op;
};

struct xrdma_ring {
	struct xrdma_pending *v;
	unsigned cap, head, count;
};

struct xrdma_conn {
	struct xrdma_dev *dev;
	struct xrdma_mr *mr;
	struct ibv_comp_channel *chan;
	struct ibv_cq *send_cq, *recv_cq; /* two CQs: to know which ring a wc belongs to */
	struct ibv_qp *qp;
	uint32_t psn;
	struct xrdma_peer peer;
	bool connected;
	bool failed; /* an error completion was seen: the QP is in the error state */
	struct xrdma_ring sq, rq;
	char err[XRDMA_ERRLEN];
};

static void set_err(char *buf, size_t len, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

static void set_err(char *buf, size_t len, const char *fmt, ...)
{
	if (!buf || len == 0)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, len, fmt, ap);
	va_end(ap);
}

/* --- peer description on the wire ------------------------------------------------ */

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p)
{
	uint32_t v = 0;
	for (int i = 0; i < 4; i++)
		v |= (uint32_t)p[i] << (8 * i);
	return v;
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

/* Layout: qpn 0, psn 4, gid 8..23, lid 24, mtu 26, pad 27, rkey 28, addr 32, len 40. */
void xrdma_peer_pack(const struct xrdma_peer *p, uint8_t out[XRDMA_PEER_WIRE_SIZE])
{
	memset(out, 0, XRDMA_PEER_WIRE_SIZE);
	put32(out, p->qpn);
	put32(out + 4, p->psn);
	memcpy(out + 8, p->gid, 16);
	out[24] = (uint8_t)p->lid;
	out[25] = (uint8_t)(p->lid >> 8);
	out[26] = p->mtu;
	put32(out + 28, p->rkey);
	put64(out + 32, p->addr);
	put64(out + 40, p->len);
}

int xrdma_peer_unpack(struct xrdma_peer *p, const uint8_t *in, size_t len)
{
	if (len != XRDMA_PEER_WIRE_SIZE)
		return -EMSGSIZE;
	memset(p, 0, sizeof(*p));
	p->qpn = get32(in);
	p->psn = get32(in + 4);
	memcpy(p->gid, in + 8, 16);
	p->lid = (uint16_t)(in[24] | in[25] << 8);
	p->mtu = in[26];
	p->rkey = get32(in + 28);
	p->addr = get64(in + 32);
	p->len = get64(in + 40);
	/* QPNs and PSNs are 24-bit; MTU is enum ibv_mtu (1..5). */
	if (p->qpn > 0xffffff || p->psn > 0xffffff || p->mtu < IBV_MTU_256 ||
	    p->mtu > IBV_MTU_4096 || p->addr + p->len < p->addr)
		return -EINVAL;
	return 0;
}

/* --- device ---------------------------------------------------------------------- */

static bool gid_is_ipv4_mapped(const union ibv_gid *g)
{
	static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
	return memcmp(g->raw, prefix, sizeof(prefix)) == 0;
}

/* Finds the RoCEv2 GID mapped from an IPv4 address, optionally of netdev ifindex
 * (0: any). Its index is not fixed: IPv6 link-local GIDs come first when the
 * interface has them, and the table changes when addresses do. */
static int find_roce_gid(struct ibv_context *ctx, int tbl_len, unsigned ifindex, union ibv_gid *gid)
{
	for (int i = 0; i < tbl_len; i++) {
		struct ibv_gid_entry e;
		/* Empty slots fail with ENODATA; skip them. */
		if (ibv_query_gid_ex(ctx, XRDMA_PORT, (uint32_t)i, &e, 0) != 0)
			continue;
		if (e.gid_type != IBV_GID_TYPE_ROCE_V2 || !gid_is_ipv4_mapped(&e.gid))
			continue;
		if (ifindex && e.ndev_ifindex != ifindex)
			continue;
		*gid = e.gid;
		return i;
	}
	return -1;
}

/* Does device ctx have a GID bound to netdev ifindex? */
static bool dev_has_netdev(struct ibv_context *ctx, unsigned ifindex)
{
	struct ibv_port_attr port;
	if (ifindex == 0 || ibv_query_port(ctx, XRDMA_PORT, &port) != 0)
		return false;
	for (int i = 0; i < port.gid_tbl_len; i++) {
		struct ibv_gid_entry e;
		if (ibv_query_gid_ex(ctx, XRDMA_PORT, (uint32_t)i, &e, 0) == 0 &&
		    e.ndev_ifindex == ifindex)
			return true;
	}
	return false;
}

int xrdma_dev_open(const char *name, struct xrdma_dev **out, char *msg, size_t msg_len)
{
	int n = 0, rc;
	struct ibv_device **list = ibv_get_device_list(&n);
	if (!list) {
		int e = errno ? errno : ENODEV;
		/* ENOSYS: the kernel has no RDMA subsystem loaded (no ib_uverbs). That
		 * is the normal case on a machine without RDMA, not a failure. */
		rc = e == ENOSYS ? -ENODEV : -e;
		set_err(msg, msg_len,
		        "no RDMA device present (cannot list devices: %s; no RDMA NIC, or "
		        "ib_uverbs/rdma_rxe not loaded)",
		        strerror(e));
		return rc;
	}
	if (n == 0) {
		set_err(msg, msg_len,
		        "no RDMA device present (no InfiniBand/RoCE NIC, no rdma_rxe link; "
		        "see /sys/class/infiniband)");
		rc = -ENODEV;
		goto clean_list;
	}

	struct xrdma_dev *dev = calloc(1, sizeof(*dev));
	if (!dev) {
		rc = -ENOMEM;
		set_err(msg, msg_len, "out of memory");
		goto clean_list;
	}

	/* Find the device: by RDMA name first, then as a netdev with a GID on it. */
	unsigned ifindex = 0;
	for (int i = 0; i < n && !dev->ctx; i++) {
		if (!name || strcmp(ibv_get_device_name(list[i]), name) == 0)
			dev->ctx = ibv_open_device(list[i]);
	}
	if (!dev->ctx && name) {
		ifindex = if_nametoindex(name);
		for (int i = 0; i < n && ifindex && !dev->ctx; i++) {
			struct ibv_context *ctx = ibv_open_device(list[i]);
			if (ctx && dev_has_netdev(ctx, ifindex))
				dev->ctx = ctx;
			else if (ctx)
				ibv_close_device(ctx);
		}
	}
	if (!dev->ctx) {
		rc = -ENODEV;
		set_err(msg, msg_len, "no RDMA device %s%s (%d device%s present)",
		        name ? "named or on interface " : "could be opened", name ? name : "", n,
		        n == 1 ? "" : "s");
		goto clean_dev;
	}

	if (ibv_query_port(dev->ctx, XRDMA_PORT, &dev->port) != 0) {
		rc = errno ? -errno : -EIO;
		set_err(msg, msg_len, "%s: cannot query port %d: %s",
		        ibv_get_device_name(dev->ctx->device), XRDMA_PORT, strerror(-rc));
		goto clean_ctx;
	}
	if (dev->port.state != IBV_PORT_ACTIVE) {
		rc = -ENETDOWN;
		set_err(msg, msg_len, "%s: port %d is %s, not active (is the interface up?)",
		        ibv_get_device_name(dev->ctx->device), XRDMA_PORT,
		        ibv_port_state_str(dev->port.state));
		goto clean_ctx;
	}

	struct ibv_device_attr dattr;
	if (ibv_query_device(dev->ctx, &dattr) != 0) {
		rc = errno ? -errno : -EIO;
		set_err(msg, msg_len, "%s: cannot query device: %s",
		        ibv_get_device_name(dev->ctx->device), strerror(-rc));
		goto clean_ctx;
	}
	dev->max_rd_atomic = dattr.max_qp_rd_atom < 16 ? dattr.max_qp_rd_atom : 16;

	dev->roce = dev->port.link_layer == IBV_LINK_LAYER_ETHERNET;
	if (dev->roce) {
		/* RoCE has no LIDs: every packet carries a GRH routed by GID, and
		 * RoCEv2 (UDP/IP) needs the GID derived from an IPv4 address. */
		dev->gid_index = find_roce_gid(dev->ctx, dev->port.gid_tbl_len, ifindex, &dev->gid);
		if (dev->gid_index < 0) {
			rc = -EADDRNOTAVAIL;
			set_err(msg, msg_len,
			        "%s: no RoCEv2 GID from an IPv4 address on port %d "
			        "(give the interface an IPv4 address)",
			        ibv_get_device_name(dev->ctx->device), XRDMA_PORT);
			goto clean_ctx;
		}
	} else {
		dev->gid_index = 0;
		if (ibv_query_gid(dev->ctx, XRDMA_PORT, 0, &dev->gid) != 0)
			memset(&dev->gid, 0, sizeof(dev->gid));
	}

	dev->pd = ibv_alloc_pd(dev->ctx);
	if (!dev->pd) {
		rc = errno ? -errno : -ENOMEM;
		set_err(msg, msg_len, "%s: cannot allocate a protection domain: %s",
		        ibv_get_device_name(dev->ctx->device), strerror(-rc));
		goto clean_ctx;
	}

	ibv_free_device_list(list);
	*out = dev;
	return 0;

clean_ctx:
	ibv_close_device(dev->ctx);
clean_dev:
	free(dev);
clean_list:
	ibv_free_device_list(list);
	return rc;
}

void xrdma_dev_close(struct xrdma_dev *dev)
{
	if (!dev)
		return;
	ibv_dealloc_pd(dev->pd);
	ibv_close_device(dev->ctx);
	free(dev);
}

const char *xrdma_dev_name(const struct xrdma_dev *dev)
{
	return ibv_get_device_name(dev->ctx->device);
}

int xrdma_dev_gid_index(const struct xrdma_dev *dev)
{
	return dev->gid_index;
}

const char *xrdma_dev_error(const struct xrdma_dev *dev)
{
	return dev->err;
}

/* --- memory regions ------------------------------------------------------------- */

int xrdma_mr_reg(struct xrdma_dev *dev, void *buf, size_t len, struct xrdma_mr **out)
{
	if (!buf || len == 0) {
		set_err(dev->err, sizeof(dev->err), "register: empty region");
		return -EINVAL;
	}
	struct xrdma_mr *m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->dev = dev;
	m->mr = ibv_reg_mr(dev->pd, buf, len,
	                   IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ |
	                           IBV_ACCESS_REMOTE_WRITE);
	if (!m->mr) {
		int rc = errno ? -errno : -ENOMEM;
		set_err(dev->err, sizeof(dev->err), "%s: cannot register %zu bytes: %s%s",
		        xrdma_dev_name(dev), len, strerror(-rc),
		        rc == -ENOMEM || rc == -EPERM ? " (check ulimit -l, memlock)" : "");
		free(m);
		return rc;
	}
	*out = m;
	return 0;
}

void xrdma_mr_dereg(struct xrdma_mr *mr)
{
	if (!mr)
		return;
	ibv_dereg_mr(mr->mr);
	free(mr);
}

void *xrdma_mr_addr(const struct xrdma_mr *mr)
{
	return mr->mr->addr;
}

size_t xrdma_mr_len(const struct xrdma_mr *mr)
{
	return mr->mr->length;
}

uint32_t xrdma_mr_rkey(const struct xrdma_mr *mr)
{
	return mr->mr->rkey;
}

/* --- connections ---------------------------------------------------------------- */

static int ring_init(struct xrdma_ring *r, unsigned cap)
{
	r->v = calloc(cap, sizeof(*r->v));
	r->cap = cap;
	r->head = r->count = 0;
	return r->v ? 0 : -ENOMEM;
}

static void ring_push(struct xrdma_ring *r, uint64_t wr_id, enum xrdma_op op)
{
	r->v[(r->head + r->count) % r->cap] = (struct xrdma_pending){wr_id, op};
	r->count++;
}

static enum xrdma_op ring_pop(struct xrdma_ring *r, uint64_t wr_id)
{
	if (r->count == 0)
		return XRDMA_OP_OTHER;
	struct xrdma_pending p = r->v[r->head];
	r->head = (r->head + 1) % r->cap;
	r->count--;
	return p.wr_id == wr_id ? p.op : XRDMA_OP_OTHER;
}

int xrdma_conn_create(struct xrdma_dev *dev, struct xrdma_mr *mr, unsigned depth,
                      struct xrdma_conn **out)
{
	int rc;
	if (depth == 0 || depth > 4096 || !mr || mr->dev != dev) {
		set_err(dev->err, sizeof(dev->err), "create QP: bad depth or region");
		return -EINVAL;
	}
	struct xrdma_conn *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->dev = dev;
	c->mr = mr;
	if ((rc = ring_init(&c->sq, depth)) != 0 || (rc = ring_init(&c->rq, depth)) != 0)
		goto clean_rings;

	c->chan = ibv_create_comp_channel(dev->ctx);
	if (!c->chan) {
		rc = errno ? -errno : -ENOMEM;
		set_err(dev->err, sizeof(dev->err), "create completion channel: %s", strerror(-rc));
		goto clean_rings;
	}
	/* Non-blocking, so that a spurious wake-up cannot block in ibv_get_cq_event. */
	int fl = fcntl(c->chan->fd, F_GETFL);
	if (fl < 0 || fcntl(c->chan->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
		rc = -errno;
		goto clean_chan;
	}

	c->send_cq = ibv_create_cq(dev->ctx, (int)depth, c, c->chan, 0);
	if (!c->send_cq) {
		rc = errno ? -errno : -ENOMEM;
		set_err(dev->err, sizeof(dev->err), "create send CQ: %s", strerror(-rc));
		goto clean_chan;
	}
	c->recv_cq = ibv_create_cq(dev->ctx, (int)depth, c, c->chan, 0);
	if (!c->recv_cq) {
		rc = errno ? -errno : -ENOMEM;
		set_err(dev->err, sizeof(dev->err), "create recv CQ: %s", strerror(-rc));
		goto clean_send_cq;
	}

	struct ibv_qp_init_attr qa = {
	        .send_cq = c->send_cq,
	        .recv_cq = c->recv_cq,
	        .cap = {.max_send_wr = depth,
	                .max_recv_wr = depth,
	                .max_send_sge = 1,
	                .max_recv_sge = 1},
	        .qp_type = IBV_QPT_RC,
	        /* Every send is signalled: the completion is how the caller learns that
	         * a READ's data has landed or a WRITE may be reused. */
	        .sq_sig_all = 1,
	};
	c->qp = ibv_create_qp(dev->pd, &qa);
	if (!c->qp) {
		rc = errno ? -errno : -ENOMEM;
		set_err(dev->err, sizeof(dev->err), "create RC QP (depth %u): %s", depth,
		        strerror(-rc));
		goto clean_recv_cq;
	}

	/* A random initial PSN, so that stale packets of an earlier QP with the same
	 * number are not taken for this one's. */
	uint32_t r = 0;
	if (getrandom(&r, sizeof(r), GRND_NONBLOCK) != sizeof(r))
		r = (uint32_t)time(NULL) ^ c->qp->qp_num;
	c->psn = r & 0xffffff;
	*out = c;
	return 0;

clean_recv_cq:
	ibv_destroy_cq(c->recv_cq);
clean_send_cq:
	ibv_destroy_cq(c->send_cq);
clean_chan:
	ibv_destroy_comp_channel(c->chan);
clean_rings:
	free(c->sq.v);
	free(c->rq.v);
	free(c);
	return rc;
}

void xrdma_conn_destroy(struct xrdma_conn *c)
{
	if (!c)
		return;
	ibv_destroy_qp(c->qp);
	ibv_destroy_cq(c->recv_cq);
	ibv_destroy_cq(c->send_cq);
	ibv_destroy_comp_channel(c->chan);
	free(c->sq.v);
	free(c->rq.v);
	free(c);
}

void xrdma_conn_local(const struct xrdma_conn *c, struct xrdma_peer *me)
{
	memset(me, 0, sizeof(*me));
	me->qpn = c->qp->qp_num;
	me->psn = c->psn;
	memcpy(me->gid, c->dev->gid.raw, 16);
	me->lid = c->dev->port.lid;
	me->mtu = (uint8_t)c->dev->port.active_mtu;
	me->rkey = c->mr->mr->rkey;
	me->addr = (uint64_t)(uintptr_t)c->mr->mr->addr;
	me->len = c->mr->mr->length;
}

const char *xrdma_conn_error(const struct xrdma_conn *c)
{
	return c->err;
}

int xrdma_conn_connect(struct xrdma_conn *c, const struct xrdma_peer *peer)
{
	struct xrdma_dev *dev = c->dev;
	if (peer->qpn == 0 || peer->qpn > 0xffffff || peer->psn > 0xffffff ||
	    peer->mtu < IBV_MTU_256 || peer->mtu > IBV_MTU_4096) {
		set_err(c->err, sizeof(c->err), "connect: bad peer description (qpn %u psn %u)",
		        peer->qpn, peer->psn);
		return -EINVAL;
	}
	c->peer = *peer;

	struct ibv_qp_attr a = {
	        .qp_state = IBV_QPS_INIT,
	        .pkey_index = 0,
	        .port_num = XRDMA_PORT,
	        .qp_access_flags =
	                IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE,
	};
	if (ibv_modify_qp(c->qp, &a,
	                  IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)) {
		int rc = errno ? -errno : -EIO;
		set_err(c->err, sizeof(c->err), "QP %u to INIT: %s", c->qp->qp_num, strerror(-rc));
		return rc;
	}

	enum ibv_mtu mtu = dev->port.active_mtu < (enum ibv_mtu)peer->mtu ? dev->port.active_mtu
	                                                                  : (enum ibv_mtu)peer->mtu;
	memset(&a, 0, sizeof(a));
	a.qp_state = IBV_QPS_RTR;
	a.path_mtu = mtu;
	a.dest_qp_num = peer->qpn;
	a.rq_psn = peer->psn;
	a.max_dest_rd_atomic = (uint8_t)dev->max_rd_atomic;
	a.min_rnr_timer = XRDMA_MIN_RNR_TIMER;
	a.ah_attr.dlid = peer->lid;
	a.ah_attr.port_num = XRDMA_PORT;
	/* RoCE: without a GRH (is_global, dgid, and the sgid_index of our RoCEv2 GID)
	 * the move to RTR fails, because Ethernet has no LID to route by. */
	static const uint8_t zero_gid[16];
	if (dev->roce || memcmp(peer->gid, zero_gid, 16) != 0) {
		a.ah_attr.is_global = 1;
		memcpy(a.ah_attr.grh.dgid.raw, peer->gid, 16);
		a.ah_attr.grh.sgid_index = (uint8_t)dev->gid_index;
		a.ah_attr.grh.hop_limit = 64;
	}
	if (ibv_modify_qp(c->qp, &a,
	                  IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
	                          IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
	                          IBV_QP_MIN_RNR_TIMER)) {
		int rc = errno ? -errno : -EIO;
		set_err(c->err, sizeof(c->err), "QP %u to RTR (peer QP %u, gid index %d): %s%s",
		        c->qp->qp_num, peer->qpn, dev->gid_index, strerror(-rc),
		        dev->roce ? " (is the peer's GID reachable from this interface?)" : "");
		return rc;
	}

	memset(&a, 0, sizeof(a));
	a.qp_state = IBV_QPS_RTS;
	a.sq_psn = c->psn;
	a.timeout = XRDMA_TIMEOUT;
	a.retry_cnt = XRDMA_RETRY;
	a.rnr_retry = XRDMA_RNR_RETRY;
	a.max_rd_atomic = (uint8_t)dev->max_rd_atomic;
	if (ibv_modify_qp(c->qp, &a,
	                  IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
	                          IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC)) {
		int rc = errno ? -errno : -EIO;
		set_err(c->err, sizeof(c->err), "QP %u to RTS: %s", c->qp->qp_num, strerror(-rc));
		return rc;
	}
	c->connected = true;
	return 0;
}

int xrdma_conn_check(struct xrdma_conn *c)
{
	if (!c->connected) {
		set_err(c->err, sizeof(c->err), "QP %u is not connected", c->qp->qp_num);
		return -ENOTCONN;
	}
	struct ibv_qp_attr a;
	struct ibv_qp_init_attr ia;
	if (ibv_query_qp(c->qp, &a, IBV_QP_STATE, &ia) != 0) {
		int rc = errno ? -errno : -EIO;
		set_err(c->err, sizeof(c->err), "QP %u: cannot query state: %s", c->qp->qp_num,
		        strerror(-rc));
		return rc;
	}
	if (a.qp_state == IBV_QPS_ERR || a.qp_state == IBV_QPS_SQE) {
		c->failed = true;
		set_err(c->err, sizeof(c->err),
		        "QP %u is in the error state: the connection must be rebuilt",
		        c->qp->qp_num);
		return -ECONNRESET;
	}
	return a.qp_state == IBV_QPS_RTS ? 0 : -ENOTCONN;
}

/* --- posting -------------------------------------------------------------------- */

static const char *op_name(enum xrdma_op op)
{
	switch (op) {
	case XRDMA_OP_READ:
		return "RDMA READ";
	case XRDMA_OP_WRITE:
		return "RDMA WRITE";
	case XRDMA_OP_SEND:
		return "SEND";
	case XRDMA_OP_RECV:
		return "RECV";
	default:
		return "work request";
	}
}

static int check_post_in(struct xrdma_conn *c, const struct xrdma_mr *mr, enum xrdma_op op,
                         size_t off, size_t len, struct xrdma_ring *ring)
{
	if (!c->connected) {
		set_err(c->err, sizeof(c->err), "%s: QP not connected", op_name(op));
		return -ENOTCONN;
	}
	if (c->failed) {
		set_err(c->err, sizeof(c->err),
		        "%s: QP %u is in the error state after an earlier failure", op_name(op),
		        c->qp->qp_num);
		return -ECONNRESET;
	}
	if (off > mr->mr->length || len > mr->mr->length - off || len > UINT32_MAX) {
		set_err(c->err, sizeof(c->err),
		        "%s: local range [%zu, +%zu) outside the %zu-byte region", op_name(op), off,
		        len, mr->mr->length);
		return -ERANGE;
	}
	if (ring->count == ring->cap) {
		set_err(c->err, sizeof(c->err), "%s: %u requests already outstanding", op_name(op),
		        ring->cap);
		return -EAGAIN;
	}
	return 0;
}

static int check_post(struct xrdma_conn *c, enum xrdma_op op, size_t off, size_t len,
                      struct xrdma_ring *ring)
{
	return check_post_in(c, c->mr, op, off, len, ring);
}

static int post_one_sided(struct xrdma_conn *c, enum xrdma_op op, uint64_t wr_id, size_t off,
                          uint64_t remote_off, size_t len)
{
	int rc = check_post(c, op, off, len, &c->sq);
	if (rc)
		return rc;
	if (remote_off > c->peer.len || len > c->peer.len - remote_off) {
		set_err(c->err, sizeof(c->err),
		        "%s: remote range [%llu, +%zu) outside the peer's %llu-byte region",
		        op_name(op), (unsigned long long)remote_off, len,
		        (unsigned long long)c->peer.len);
		return -ERANGE;
	}
	struct ibv_sge sge = {
	        .addr = (uint64_t)(uintptr_t)c->mr->mr->addr + off,
	        .length = (uint32_t)len,
	        .lkey = c->mr->mr->lkey,
	};
	struct ibv_send_wr wr = {
	        .wr_id = wr_id,
	        .sg_list = &sge,
	        .num_sge = 1,
	        .opcode = op == XRDMA_OP_READ ? IBV_WR_RDMA_READ : IBV_WR_RDMA_WRITE,
	        .wr.rdma = {.remote_addr = c->peer.addr + remote_off, .rkey = c->peer.rkey},
	};
	struct ibv_send_wr *bad;
	rc = ibv_post_send(c->qp, &wr, &bad);
	if (rc) {
		set_err(c->err, sizeof(c->err), "%s wr_id=%llu: post failed: %s", op_name(op),
		        (unsigned long long)wr_id, strerror(rc));
		return -rc;
	}
	ring_push(&c->sq, wr_id, op);
	return 0;
}

int xrdma_post_read(struct xrdma_conn *c, uint64_t wr_id, size_t off, uint64_t remote_off,
                    size_t len)
{
	return post_one_sided(c, XRDMA_OP_READ, wr_id, off, remote_off, len);
}

int xrdma_post_write(struct xrdma_conn *c, uint64_t wr_id, size_t off, uint64_t remote_off,
                     size_t len)
{
	return post_one_sided(c, XRDMA_OP_WRITE, wr_id, off, remote_off, len);
}

int xrdma_post_send(struct xrdma_conn *c, uint64_t wr_id, size_t off, size_t len)
{
	return xrdma_post_send_in(c, c->mr, wr_id, off, len);
}

int xrdma_post_send_in(struct xrdma_conn *c, struct xrdma_mr *mr, uint64_t wr_id, size_t off,
                       size_t len)
{
	int rc = check_post_in(c, mr, XRDMA_OP_SEND, off, len, &c->sq);
	if (rc)
		return rc;
	struct ibv_sge sge = {
	        .addr = (uint64_t)(uintptr_t)mr->mr->addr + off,
	        .length = (uint32_t)len,
	        .lkey = mr->mr->lkey,
	};
	struct ibv_send_wr wr = {
	        .wr_id = wr_id, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_SEND};
	struct ibv_send_wr *bad;
	rc = ibv_post_send(c->qp, &wr, &bad);
	if (rc) {
		set_err(c->err, sizeof(c->err), "SEND wr_id=%llu: post failed: %s",
		        (unsigned long long)wr_id, strerror(rc));
		return -rc;
	}
	ring_push(&c->sq, wr_id, XRDMA_OP_SEND);
	return 0;
}

int xrdma_post_recv(struct xrdma_conn *c, uint64_t wr_id, size_t off, size_t len)
{
	return xrdma_post_recv_in(c, c->mr, wr_id, off, len);
}

int xrdma_post_recv_in(struct xrdma_conn *c, struct xrdma_mr *mr, uint64_t wr_id, size_t off,
                       size_t len)
{
	/* Only the bounds and the error state are checked here, not `connected`;
	 * the QP must be past RESET though (rxe answers EINVAL there). */
	if (c->failed) {
		set_err(c->err, sizeof(c->err), "RECV: QP %u is in the error state", c->qp->qp_num);
		return -ECONNRESET;
	}
	if (off > mr->mr->length || len > mr->mr->length - off || len > UINT32_MAX) {
		set_err(c->err, sizeof(c->err), "RECV: local range [%zu, +%zu) outside the region",
		        off, len);
		return -ERANGE;
	}
	if (c->rq.count == c->rq.cap) {
		set_err(c->err, sizeof(c->err), "RECV: %u receives already posted", c->rq.cap);
		return -EAGAIN;
	}
	struct ibv_sge sge = {
	        .addr = (uint64_t)(uintptr_t)mr->mr->addr + off,
	        .length = (uint32_t)len,
	        .lkey = mr->mr->lkey,
	};
	struct ibv_recv_wr wr = {.wr_id = wr_id, .sg_list = &sge, .num_sge = 1};
	struct ibv_recv_wr *bad;
	int rc = ibv_post_recv(c->qp, &wr, &bad);
	if (rc) {
		set_err(c->err, sizeof(c->err), "RECV wr_id=%llu: post failed: %s",
		        (unsigned long long)wr_id, strerror(rc));
		return -rc;
	}
	ring_push(&c->rq, wr_id, XRDMA_OP_RECV);
	return 0;
}

/* --- completions ---------------------------------------------------------------- */

/* The errno for a failed completion, and why, in words a user can act on. */
static int wc_errno(enum ibv_wc_status s, const char **why)
{
	switch (s) {
	case IBV_WC_REM_ACCESS_ERR:
		*why = "remote access error (bad rkey, or range outside the peer's region)";
		return -EACCES;
	case IBV_WC_LOC_PROT_ERR:
	case IBV_WC_LOC_ACCESS_ERR:
		*why = "local protection error (buffer outside the registered region)";
		return -EFAULT;
	case IBV_WC_RETRY_EXC_ERR:
		*why = "transport retries exhausted: the peer does not answer (gone?)";
		return -ETIMEDOUT;
	case IBV_WC_RNR_RETRY_EXC_ERR:
		*why = "receiver not ready: the peer posted no receive in time";
		return -ECONNREFUSED;
	case IBV_WC_WR_FLUSH_ERR:
		*why = "flushed: the QP had gone to the error state";
		return -ECANCELED;
	case IBV_WC_LOC_LEN_ERR:
	case IBV_WC_REM_INV_REQ_ERR:
		*why = "length error (message longer than the receive buffer?)";
		return -EMSGSIZE;
	case IBV_WC_REM_OP_ERR:
		*why = "remote operation error";
		return -EREMOTEIO;
	default:
		*why = "I/O error";
		return -EIO;
	}
}

static int poll_cq(struct xrdma_conn *c, struct ibv_cq *cq, struct xrdma_ring *ring,
                   struct xrdma_wc *out, int max)
{
	struct ibv_wc wc[16];
	int got = 0;
	while (got < max) {
		int want = max - got < 16 ? max - got : 16;
		int n = ibv_poll_cq(cq, want, wc);
		if (n < 0) {
			set_err(c->err, sizeof(c->err), "poll CQ failed");
			return -EIO;
		}
		for (int i = 0; i < n; i++) {
			struct xrdma_wc *w = &out[got++];
			w->wr_id = wc[i].wr_id;
			w->op = ring_pop(ring, wc[i].wr_id);
			w->byte_len = wc[i].byte_len;
			w->status = 0;
			if (wc[i].status != IBV_WC_SUCCESS) {
				const char *why;
				w->status = wc_errno(wc[i].status, &why);
				/* Every error completion moves an RC QP to the error state. */
				c->failed = true;
				/* Keep the first reason: later ones are flushes it caused. */
				if (w->status != -ECANCELED || !c->err[0])
					set_err(c->err, sizeof(c->err),
					        "%s wr_id=%llu on QP %u: %s [%s]", op_name(w->op),
					        (unsigned long long)w->wr_id, c->qp->qp_num, why,
					        ibv_wc_status_str(wc[i].status));
			}
		}
		if (n < want)
			break;
	}
	return got;
}

static int poll_both(struct xrdma_conn *c, struct xrdma_wc *wcs, int max)
{
	int n = poll_cq(c, c->send_cq, &c->sq, wcs, max);
	if (n < 0 || n == max)
		return n;
	int m = poll_cq(c, c->recv_cq, &c->rq, wcs + n, max - n);
	return m < 0 ? m : n + m;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Consumes the channel's pending events; each must be acknowledged, or destroying
 * the CQ blocks forever. The fd is non-blocking, so this never sleeps. */
static void drain_events(struct xrdma_conn *c)
{
	struct ibv_cq *ev_cq;
	void *ev_ctx;
	while (ibv_get_cq_event(c->chan, &ev_cq, &ev_ctx) == 0)
		ibv_ack_cq_events(ev_cq, 1);
}

int xrdma_poll(struct xrdma_conn *c, struct xrdma_wc *wcs, int max, int timeout_ms)
{
	if (max <= 0)
		return -EINVAL;
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	for (;;) {
		int n = poll_both(c, wcs, max);
		if (n != 0)
			return n;
		/* Arm both CQs, then poll again: a completion that arrived between the
		 * first poll and the arming raises no event. */
		drain_events(c);
		if (ibv_req_notify_cq(c->send_cq, 0) || ibv_req_notify_cq(c->recv_cq, 0)) {
			set_err(c->err, sizeof(c->err), "arming CQ notification failed");
			return -EIO;
		}
		n = poll_both(c, wcs, max);
		if (n != 0 || timeout_ms == 0)
			return n;
		int wait = -1;
		if (deadline >= 0) {
			int64_t left = deadline - now_ms();
			if (left <= 0) {
				set_err(c->err, sizeof(c->err),
				        "no completion on QP %u within %d ms", c->qp->qp_num,
				        timeout_ms);
				return -ETIMEDOUT;
			}
			wait = (int)left;
		}
		struct pollfd pfd = {.fd = c->chan->fd, .events = POLLIN};
		if (poll(&pfd, 1, wait) < 0 && errno != EINTR)
			return -errno;
	}
}

int xrdma_conn_fd(const struct xrdma_conn *c)
{
	return c->chan->fd;
}

int xrdma_wait(struct xrdma_conn *c, uint64_t wr_id, int timeout_ms)
{
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	for (;;) {
		int left = -1;
		if (deadline >= 0) {
			int64_t l = deadline - now_ms();
			left = l < 0 ? 0 : (int)l;
		}
		struct xrdma_wc wc;
		int n = xrdma_poll(c, &wc, 1, left);
		if (n < 0)
			return n;
		if (n == 0) {
			set_err(c->err, sizeof(c->err), "wr_id=%llu: no completion within %d ms",
			        (unsigned long long)wr_id, timeout_ms);
			return -ETIMEDOUT;
		}
		if (wc.wr_id == wr_id)
			return wc.status;
	}
}
