/* A small verbs layer for the RDMA transport (libibverbs, rdma-core).
 *
 * One device per process (the RDMA NIC or a soft-RoCE rxe device), one protection
 * domain, one memory region registered ONCE for a whole arena, and reliable-connected
 * queue pairs whose peer is described by a struct xrdma_peer that the caller exchanges
 * out of band (over the transport's TCP channel in HELLO; over a socket in the tests).
 * On that channel this layer never talks itself: it hands out its local description
 * and takes the peer's.
 *
 * The prefix is xrdma_, not rdma_: librdmacm (also a dependency) owns rdma_*, and its
 * <rdma/rdma_verbs.h> already defines rdma_post_read and rdma_post_write.
 *
 * Every function returns 0 (or a count) or a negative errno code; kvm_strerror() gives
 * the generic text, and the handle's xrdma_*_error() the specific reason, e.g.
 * "RDMA READ wr_id=7 on QP 24: remote access error (bad rkey, or range outside the
 * peer's region) [remote access error]". The objects are not
 * thread-safe: one thread drives one connection (verbs themselves are thread-safe, the
 * bookkeeping here is not).
 */
#ifndef KVMESH_TRANSPORT_RDMA_H
#define KVMESH_TRANSPORT_RDMA_H

#include <stddef.h>
#include <stdint.h>

struct xrdma_dev;  /* opened device, its PD, chosen port and GID */
struct xrdma_mr;   /* one registered region (an arena) */
struct xrdma_conn; /* one RC queue pair with its send and receive CQs */

/* Length of the message buffer that xrdma_dev_open fills when it fails. */
#define XRDMA_ERRLEN 192

/* What one side tells the other so that both can connect their queue pairs, and what
 * the remote side may read or write: [addr, addr + len) under rkey. */
struct xrdma_peer {
	uint32_t qpn;    /* queue pair number */
	uint32_t psn;    /* first packet sequence number this side sends */
	uint8_t gid[16]; /* port GID (RoCE: IPv4-mapped IPv6 address) */
	uint16_t lid;    /* InfiniBand local id; 0 on RoCE */
	uint8_t mtu;     /* enum ibv_mtu of the port (path MTU = min of both) */
	uint8_t pad;
	uint32_t rkey; /* of the peer's registered region */
	uint64_t addr; /* its start address in the peer's address space */
	uint64_t len;  /* its length */
};

/* Size of a packed struct xrdma_peer on the wire (little-endian, fixed layout). */
#define XRDMA_PEER_WIRE_SIZE 48

/* Writes p into out as XRDMA_PEER_WIRE_SIZE little-endian bytes. */
void xrdma_peer_pack(const struct xrdma_peer *p, uint8_t out[XRDMA_PEER_WIRE_SIZE]);
/* Reads a packed peer; -EMSGSIZE if len != XRDMA_PEER_WIRE_SIZE, -EINVAL if a field
 * is impossible (qpn or psn wider than 24 bits, mtu not an enum ibv_mtu, addr + len
 * overflowing). */
int xrdma_peer_unpack(struct xrdma_peer *p, const uint8_t *in, size_t len);

/* Opens an RDMA device and allocates its protection domain.
 *
 * name: an RDMA device name ("rxe0", "mlx5_0"), or a network interface name ("eth0",
 * "veth1") whose RDMA device is wanted, or NULL for the first device found.
 * Port 1 is used. On RoCE the GID is the RoCEv2 one mapped from an IPv4 address of the
 * interface, found by scanning the GID table (its index is not fixed: it depends on
 * which IPv6 addresses the interface has). On InfiniBand it is GID index 0.
 *
 * Returns 0 and *out, or: -ENODEV when there is no RDMA device at all or none by that
 * name (msg says which), -ENETDOWN when the port is not active, -EADDRNOTAVAIL when a
 * RoCE port has no IPv4-mapped RoCEv2 GID yet (the interface has no IPv4 address), or
 * another code from the verbs. msg (may be NULL) receives a one-line reason on failure.
 * The caller owns *out and frees it with xrdma_dev_close. */
int xrdma_dev_open(const char *name, struct xrdma_dev **out, char *msg, size_t msg_len);
/* Frees dev. Every region and connection of it must be freed first. NULL is a no-op. */
void xrdma_dev_close(struct xrdma_dev *dev);
/* The RDMA device's name, e.g. "rxe0". */
const char *xrdma_dev_name(const struct xrdma_dev *dev);
/* The GID index chosen by xrdma_dev_open. */
int xrdma_dev_gid_index(const struct xrdma_dev *dev);
/* The reason for the last failure of a call on dev ("" if none). */
const char *xrdma_dev_error(const struct xrdma_dev *dev);

/* Registers [buf, buf + len) once, for local use and remote READ and WRITE. buf stays
 * owned by the caller and must outlive the region. Registration pins the pages, so it
 * is slow for large arenas: do it at start-up, never per transfer. */
int xrdma_mr_reg(struct xrdma_dev *dev, void *buf, size_t len, struct xrdma_mr **out);
/* Deregisters mr. Every connection that uses it must be destroyed first. NULL: no-op. */
void xrdma_mr_dereg(struct xrdma_mr *mr);
void *xrdma_mr_addr(const struct xrdma_mr *mr);
size_t xrdma_mr_len(const struct xrdma_mr *mr);
uint32_t xrdma_mr_rkey(const struct xrdma_mr *mr);

/* Creates an RC queue pair (in state RESET until xrdma_conn_connect) whose work
 * requests address the region mr, with room for `depth` outstanding sends (READ,
 * WRITE, SEND) and as many receives, and its completion queues and channel. The
 * caller owns *out. Post receives after xrdma_conn_connect: rxe (soft-RoCE) refuses
 * them while the QP is in RESET (EINVAL), though the spec allows them from INIT. */
int xrdma_conn_create(struct xrdma_dev *dev, struct xrdma_mr *mr, unsigned depth,
                      struct xrdma_conn **out);
/* Destroys conn; outstanding work requests are dropped. NULL is a no-op. */
void xrdma_conn_destroy(struct xrdma_conn *conn);
/* Fills *me with what the peer needs: this QP's number, PSN, GID, and the region. */
void xrdma_conn_local(const struct xrdma_conn *conn, struct xrdma_peer *me);
/* Moves the QP to INIT, RTR (ready to receive, from the peer's description) and RTS.
 * -EINVAL for a bad peer description; otherwise the verbs' code, with the state that
 * failed in xrdma_conn_error(). After an error the conn must be destroyed. */
int xrdma_conn_connect(struct xrdma_conn *conn, const struct xrdma_peer *peer);
/* The reason for the last failure on conn ("" if none). */
const char *xrdma_conn_error(const struct xrdma_conn *conn);
/* 0 while the QP can carry work; -ENOTCONN before connect, -ECONNRESET once the QP is
 * in the error state (a failed work request or a fatal async event moved it there:
 * every later request fails, so the connection must be rebuilt). */
int xrdma_conn_check(struct xrdma_conn *conn);

/* One-sided operations: local [off, off + len) of the conn's region and remote
 * [peer.addr + remote_off, ... + len) of the peer's region. The peer's CPU is not
 * involved and it gets no completion. Bounds are checked here against both regions
 * (-ERANGE) so that a bad offset is a clear local error, not a QP teardown. */
int xrdma_post_read(struct xrdma_conn *conn, uint64_t wr_id, size_t off, uint64_t remote_off,
                    size_t len);
int xrdma_post_write(struct xrdma_conn *conn, uint64_t wr_id, size_t off, uint64_t remote_off,
                     size_t len);
/* Two-sided: SEND of local [off, off + len) into a RECV the peer posted; RECV posts
 * local [off, off + len) as the buffer of the next incoming SEND. */
int xrdma_post_send(struct xrdma_conn *conn, uint64_t wr_id, size_t off, size_t len);
int xrdma_post_recv(struct xrdma_conn *conn, uint64_t wr_id, size_t off, size_t len);
/* The same with offsets into another region of the same device (a message ring
 * that is not the arena the conn was created with). */
int xrdma_post_send_in(struct xrdma_conn *conn, struct xrdma_mr *mr, uint64_t wr_id, size_t off,
                       size_t len);
int xrdma_post_recv_in(struct xrdma_conn *conn, struct xrdma_mr *mr, uint64_t wr_id, size_t off,
                       size_t len);

enum xrdma_op { XRDMA_OP_READ, XRDMA_OP_WRITE, XRDMA_OP_SEND, XRDMA_OP_RECV, XRDMA_OP_OTHER };

/* One completion. status is 0 or a negative errno code mapped from the verbs status:
 * -EACCES remote access error (bad rkey, range, or permission), -ETIMEDOUT transport
 * retries exhausted (the peer is gone), -ECONNREFUSED receiver-not-ready retries
 * exhausted (the peer posts no receives), -ECANCELED flushed because the QP went to
 * the error state, -EMSGSIZE a message longer than the receive buffer, -EIO others. */
struct xrdma_wc {
	uint64_t wr_id;
	enum xrdma_op op;
	int status;
	uint32_t byte_len; /* RECV: bytes received */
};

/* Waits up to timeout_ms (0: do not wait, -1: forever) for completions and stores up
 * to max of them in wcs. Returns how many (>= 1; 0 only when timeout_ms is 0, and
 * then the CQs are armed: see xrdma_conn_fd), -ETIMEDOUT if none came in time, or
 * another negative code if polling failed. Finding nothing costs two system calls
 * (consume channel events, arm); finding completions costs none on most NICs. A failed completion
 * is returned with its status set (and the reason kept in xrdma_conn_error); it is not an error of
 * the call. The wait sleeps on the completion channel; it does not spin. */
int xrdma_poll(struct xrdma_conn *conn, struct xrdma_wc *wcs, int max, int timeout_ms);

/* For an event loop (epoll) instead of blocking in xrdma_poll: the completion
 * channel's descriptor (non-blocking). xrdma_poll leaves both CQs armed whenever it
 * returns 0, and the descriptor becomes readable at the next completion after that.
 * So: when it is readable, call xrdma_poll(conn, wcs, max, 0) until it returns 0. */
int xrdma_conn_fd(const struct xrdma_conn *conn);

/* Posts nothing; waits for the completion of wr_id, discarding others that come
 * first (convenience for one request in flight). Returns its status, or -ETIMEDOUT. */
int xrdma_wait(struct xrdma_conn *conn, uint64_t wr_id, int timeout_ms);

#endif
