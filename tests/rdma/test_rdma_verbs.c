/* Tests of the RDMA verbs layer (transport/rdma.h) between two processes.
 *
 * A plain program rather than a Criterion suite: it runs inside the emulated machine
 * of `make test-rdma` (tests/rdma/run-qemu.sh), where a small initramfs is easier to
 * keep without Criterion's forking runner and its libraries, and its last line is
 * "N passed, N failed".
 *
 *   test_rdma_verbs [--dev NAME]                  one node: forks a peer on the same device
 *   test_rdma_verbs --serve PORT [--dev NAME]     the peer, serving one client over TCP
 *   test_rdma_verbs --connect IP:PORT [--dev NAME] two nodes: tests against that peer
 *   --netdev IFACE: the interface under --dev, also checked to find the device by
 *
 * The client drives: it posts the one-sided READs and WRITEs and asks the peer, over
 * the control stream (a socketpair, or TCP between namespaces), to fill or check its
 * region, to post receives or sends, to build a new queue pair, or to die.
 * Exit status: 0 all passed, 1 something failed, 77 skipped (no RDMA device here).
 */
#include "common/kvm_error.h"
#include "transport/rdma.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ARENA_LEN         (17u << 20) /* 8 MB blocks at two offsets, plus room for slack */
#define DEPTH             64
#define OP_TIMEOUT_MS     30000 /* one completion, in emulation: generous */
#define DEATH_DEADLINE_MS 20000 /* a dead peer must be noticed within this */
#define EXIT_SKIP         77

static const char *g_tag = "one-node";
static const char *g_netdev; /* --netdev: the interface under --dev, to find it by */
static int g_passed, g_failed;

/* --- control stream -------------------------------------------------------------- */

enum cmd_op {
	CMD_CONNECT = 1, /* new QP on the peer; then both exchange xrdma_peer */
	CMD_FILL,        /* fill [off, +len) with pattern seed */
	CMD_CHECK,       /* check [off, +len) against pattern seed */
	CMD_RECV_POST,   /* post a receive of [off, +len) as wr_id seed */
	CMD_RECV_WAIT,   /* wait for receive wr_id seed; reply status and byte_len */
	CMD_SEND,        /* send [off, +len), wait for its completion */
	CMD_DIE,         /* SIGKILL itself, without a reply */
	CMD_BYE,         /* exit cleanly */
};

/* Both ends are the same binary on the same architecture: native layout is fine. */
struct cmd {
	uint32_t op, pad;
	uint64_t off, len, seed;
};

struct reply {
	int32_t status, pad;
	uint64_t val;
};

static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -EPIPE;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int read_all(int fd, void *buf, size_t len)
{
	char *p = buf;
	while (len) {
		ssize_t n = read(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -ECONNRESET;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Sends our description, reads the peer's. */
static int exchange(int fd, const struct xrdma_peer *me, struct xrdma_peer *peer)
{
	uint8_t buf[XRDMA_PEER_WIRE_SIZE];
	xrdma_peer_pack(me, buf);
	int rc = write_all(fd, buf, sizeof(buf));
	if (rc == 0)
		rc = read_all(fd, buf, sizeof(buf));
	if (rc == 0)
		rc = xrdma_peer_unpack(peer, buf, sizeof(buf));
	return rc;
}

/* --- payload pattern -------------------------------------------------------------- */

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static void fill(uint8_t *p, size_t len, uint64_t seed)
{
	for (size_t i = 0; i < len; i += 8) {
		uint64_t v = mix(seed * 0x100000001b3ull + i);
		memcpy(p + i, &v, len - i < 8 ? len - i : 8);
	}
}

/* Returns -1 if equal, or the offset of the first differing byte. */
static long check(const uint8_t *p, size_t len, uint64_t seed)
{
	for (size_t i = 0; i < len; i += 8) {
		uint64_t v = mix(seed * 0x100000001b3ull + i);
		size_t n = len - i < 8 ? len - i : 8;
		if (memcmp(p + i, &v, n) != 0)
			return (long)i;
	}
	return -1;
}

/* --- arena and device ------------------------------------------------------------- */

struct side {
	struct xrdma_dev *dev;
	struct xrdma_mr *mr;
	struct xrdma_conn *conn;
	uint8_t *arena;
};

static int side_open(struct side *s, const char *devname)
{
	char msg[XRDMA_ERRLEN] = "";
	memset(s, 0, sizeof(*s));
	int rc = xrdma_dev_open(devname, &s->dev, msg, sizeof(msg));
	if (rc) {
		fprintf(stderr, "test_rdma_verbs: %s (%s)\n", msg, kvm_strerror(rc));
		return rc;
	}
	/* One region for the whole arena, registered once, as the transport does. */
	s->arena =
	        mmap(NULL, ARENA_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (s->arena == MAP_FAILED) {
		xrdma_dev_close(s->dev);
		return -ENOMEM;
	}
	rc = xrdma_mr_reg(s->dev, s->arena, ARENA_LEN, &s->mr);
	if (rc) {
		fprintf(stderr, "test_rdma_verbs: %s\n", xrdma_dev_error(s->dev));
		munmap(s->arena, ARENA_LEN);
		xrdma_dev_close(s->dev);
	}
	return rc;
}

static void side_close(struct side *s)
{
	xrdma_conn_destroy(s->conn);
	xrdma_mr_dereg(s->mr);
	xrdma_dev_close(s->dev);
	munmap(s->arena, ARENA_LEN);
}

/* A fresh QP connected to the peer's fresh QP; bad_rkey corrupts what we were told. */
static int side_connect(struct side *s, int fd, bool bad_rkey)
{
	xrdma_conn_destroy(s->conn);
	s->conn = NULL;
	int rc = xrdma_conn_create(s->dev, s->mr, DEPTH, &s->conn);
	if (rc) {
		fprintf(stderr, "create QP: %s\n", xrdma_dev_error(s->dev));
		return rc;
	}
	struct xrdma_peer me, peer;
	xrdma_conn_local(s->conn, &me);
	if ((rc = exchange(fd, &me, &peer)) != 0)
		return rc;
	if (bad_rkey)
		peer.rkey ^= 0x5a5a5a00u;
	rc = xrdma_conn_connect(s->conn, &peer);
	if (rc)
		fprintf(stderr, "connect: %s\n", xrdma_conn_error(s->conn));
	return rc;
}

/* --- the peer --------------------------------------------------------------------- */

static int serve(int fd, const char *devname)
{
	struct side s;
	int rc = side_open(&s, devname);
	if (rc)
		return 1;
	for (;;) {
		struct cmd c;
		struct reply r = {0};
		if (read_all(fd, &c, sizeof(c)) != 0)
			break; /* client gone */
		bool range_ok = c.off <= ARENA_LEN && c.len <= ARENA_LEN - c.off;
		switch (c.op) {
		case CMD_CONNECT:
			/* The reply comes after the exchange, which is the handshake. */
			r.status = side_connect(&s, fd, false);
			break;
		case CMD_FILL:
			if (!range_ok) {
				r.status = -ERANGE;
				break;
			}
			fill(s.arena + c.off, c.len, c.seed);
			break;
		case CMD_CHECK: {
			if (!range_ok) {
				r.status = -ERANGE;
				break;
			}
			long at = check(s.arena + c.off, c.len, c.seed);
			r.status = at < 0 ? 0 : -EBADMSG;
			r.val = (uint64_t)at;
			break;
		}
		case CMD_RECV_POST:
			r.status =
			        s.conn ? xrdma_post_recv(s.conn, c.seed, c.off, c.len) : -ENOTCONN;
			break;
		case CMD_RECV_WAIT: {
			struct xrdma_wc wc;
			int n = s.conn ? xrdma_poll(s.conn, &wc, 1, OP_TIMEOUT_MS) : -ENOTCONN;
			r.status = n < 0 ? n : wc.wr_id != c.seed ? -EPROTO : wc.status;
			r.val = n > 0 ? wc.byte_len : 0;
			break;
		}
		case CMD_SEND:
			r.status =
			        s.conn ? xrdma_post_send(s.conn, c.seed, c.off, c.len) : -ENOTCONN;
			if (r.status == 0)
				r.status = xrdma_wait(s.conn, c.seed, OP_TIMEOUT_MS);
			break;
		case CMD_DIE:
			/* The kernel tears the QP down with the process, as in a crash. */
			kill(getpid(), SIGKILL);
			break;
		case CMD_BYE:
			side_close(&s);
			return 0;
		default:
			r.status = -EINVAL;
		}
		if (write_all(fd, &r, sizeof(r)) != 0)
			break;
	}
	side_close(&s);
	return 0;
}

/* --- the client's tests ----------------------------------------------------------- */

struct ctx {
	int fd;
	struct side s;
	pid_t child; /* one-node: the forked peer, else 0 */
};

static int rpc(struct ctx *t, uint32_t op, uint64_t off, uint64_t len, uint64_t seed, uint64_t *val)
{
	struct cmd c = {.op = op, .off = off, .len = len, .seed = seed};
	struct reply r;
	int rc = write_all(t->fd, &c, sizeof(c));
	if (rc == 0 && op == CMD_CONNECT)
		rc = side_connect(&t->s, t->fd, false);
	if (rc == 0)
		rc = read_all(t->fd, &r, sizeof(r));
	if (rc)
		return rc;
	if (val)
		*val = r.val;
	return r.status;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void result(bool ok, const char *name, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

static void result(bool ok, const char *name, const char *fmt, ...)
{
	char why[256] = "";
	if (fmt) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(why, sizeof(why), fmt, ap);
		va_end(ap);
	}
	printf("[%s] %s %s%s%s\n", g_tag, ok ? "ok  " : "FAIL", name, why[0] ? ": " : "", why);
	fflush(stdout);
	if (ok)
		g_passed++;
	else
		g_failed++;
}

static const size_t sizes[] = {4096, 65536, 1u << 20, 8u << 20};

/* RDMA WRITE of each size from our region into the peer's, checked by the peer. */
static void t_write(struct ctx *t)
{
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		size_t len = sizes[i], loff = 4096 * i, roff = (8u << 20) + 4096 * (i + 1);
		char name[64];
		snprintf(name, sizeof(name), "rdma_write_%zuk", len >> 10);
		uint64_t seed = 1000 + i, at = 0;
		fill(t->s.arena + loff, len, seed);
		int64_t t0 = now_ms();
		int rc = xrdma_post_write(t->s.conn, 100 + i, loff, roff, len);
		if (rc == 0)
			rc = xrdma_wait(t->s.conn, 100 + i, OP_TIMEOUT_MS);
		int64_t dt = now_ms() - t0;
		if (rc) {
			result(false, name, "%s (%s)", kvm_strerror(rc),
			       xrdma_conn_error(t->s.conn));
			continue;
		}
		rc = rpc(t, CMD_CHECK, roff, len, seed, &at);
		if (rc)
			result(false, name, "peer's bytes differ at offset %llu (%s)",
			       (unsigned long long)at, kvm_strerror(rc));
		else
			result(true, name, "%zu bytes checked in %lld ms", len, (long long)dt);
	}
}

/* RDMA READ of each size from the peer's region (filled by the peer) into ours. */
static void t_read(struct ctx *t)
{
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		size_t len = sizes[i], loff = (8u << 20) + 8192 * i, roff = 4096 * (i + 3);
		char name[64];
		snprintf(name, sizeof(name), "rdma_read_%zuk", len >> 10);
		uint64_t seed = 2000 + i;
		int rc = rpc(t, CMD_FILL, roff, len, seed, NULL);
		if (rc) {
			result(false, name, "peer fill: %s", kvm_strerror(rc));
			continue;
		}
		memset(t->s.arena + loff, 0, len);
		int64_t t0 = now_ms();
		rc = xrdma_post_read(t->s.conn, 200 + i, loff, roff, len);
		if (rc == 0)
			rc = xrdma_wait(t->s.conn, 200 + i, OP_TIMEOUT_MS);
		int64_t dt = now_ms() - t0;
		if (rc) {
			result(false, name, "%s (%s)", kvm_strerror(rc),
			       xrdma_conn_error(t->s.conn));
			continue;
		}
		long at = check(t->s.arena + loff, len, seed);
		if (at >= 0)
			result(false, name, "bytes read differ at offset %ld", at);
		else
			result(true, name, "%zu bytes checked in %lld ms", len, (long long)dt);
	}
}

/* Several READs and WRITEs in flight at once, completions collected by xrdma_poll. */
static void t_pipelined(struct ctx *t)
{
	enum { N = 16, LEN = 65536 };
	int rc = 0;
	for (int i = 0; i < N && rc == 0; i++)
		rc = rpc(t, CMD_FILL, (uint64_t)i * LEN, LEN, 3000 + (uint64_t)i, NULL);
	for (int i = 0; i < N && rc == 0; i++) {
		fill(t->s.arena + (8u << 20) + (size_t)i * LEN, LEN, 4000 + (uint64_t)i);
		rc = xrdma_post_read(t->s.conn, 300 + (uint64_t)i, (size_t)i * LEN,
		                     (uint64_t)i * LEN, LEN);
		if (rc == 0)
			rc = xrdma_post_write(t->s.conn, 400 + (uint64_t)i,
			                      (8u << 20) + (size_t)i * LEN,
			                      (8u << 20) + (uint64_t)i * LEN, LEN);
	}
	/* Completions collected as the transport's event loop will: sleep in epoll on
	 * the completion channel, then poll without waiting until nothing is left
	 * (xrdma_poll returning 0 leaves the CQs armed). */
	int ep = epoll_create1(EPOLL_CLOEXEC), done = 0, wakeups = 0;
	struct epoll_event ev = {.events = EPOLLIN};
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, xrdma_conn_fd(t->s.conn), &ev) != 0)
		rc = -errno;
	while (rc == 0 && done < 2 * N) {
		struct xrdma_wc wc[8];
		int n;
		while (rc == 0 && (n = xrdma_poll(t->s.conn, wc, 8, 0)) != 0) {
			if (n < 0)
				rc = n;
			for (int k = 0; k < n && rc == 0; k++, done++)
				rc = wc[k].status;
		}
		if (rc == 0 && done < 2 * N) {
			int e = epoll_wait(ep, &ev, 1, OP_TIMEOUT_MS);
			rc = e < 0 ? -errno : e == 0 ? -ETIMEDOUT : 0;
			wakeups++;
		}
	}
	if (ep >= 0)
		close(ep);
	for (int i = 0; i < N && rc == 0; i++) {
		if (check(t->s.arena + (size_t)i * LEN, LEN, 3000 + (uint64_t)i) >= 0)
			rc = -EBADMSG;
		else
			rc = rpc(t, CMD_CHECK, (8u << 20) + (uint64_t)i * LEN, LEN,
			         4000 + (uint64_t)i, NULL);
	}
	if (rc)
		result(false, "pipelined_16_reads_16_writes", "%s (%s)", kvm_strerror(rc),
		       xrdma_conn_error(t->s.conn));
	else
		result(true, "pipelined_16_reads_16_writes", "epoll woke %d times", wakeups);
}

/* The event-loop path: an 8 MB READ is still in flight when we first look, so
 * xrdma_poll(0) finds nothing and arms the CQs, and epoll on xrdma_conn_fd must
 * wake us when the READ completes. */
static void t_event_loop(struct ctx *t)
{
	const size_t len = 8u << 20;
	int rc = rpc(t, CMD_FILL, 0, len, 6000, NULL), first = -1, wakeups = 0;
	struct xrdma_wc wc = {.status = -EINPROGRESS};
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN};
	if (rc == 0 && (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, xrdma_conn_fd(t->s.conn), &ev)))
		rc = -errno;
	if (rc == 0)
		rc = xrdma_post_read(t->s.conn, 600, 0, 0, len);
	if (rc == 0)
		first = xrdma_poll(t->s.conn, &wc, 1, 0);
	int n = first;
	while (rc == 0 && n == 0) {
		int e = epoll_wait(ep, &ev, 1, OP_TIMEOUT_MS);
		if (e <= 0) {
			rc = e < 0 ? -errno : -ETIMEDOUT;
			break;
		}
		wakeups++;
		n = xrdma_poll(t->s.conn, &wc, 1, 0);
	}
	if (ep >= 0)
		close(ep);
	if (rc == 0 && n < 0)
		rc = n;
	if (rc == 0)
		rc = wc.status;
	if (rc == 0 && check(t->s.arena, len, 6000) >= 0)
		rc = -EBADMSG;
	/* first == 1: the READ beat us to the first poll; the path was not exercised,
	 * which is no failure of the layer, so say so rather than fail. */
	result(rc == 0 && (first == 1 || wakeups >= 1), "event_loop_epoll_wakeup",
	       "rc=%d (%s); first poll %d, %d wake-up(s)%s", rc, kvm_strerror(rc), first, wakeups,
	       first == 1 ? " (completed before the first poll: not exercised)" : "");
}

/* SEND/RECV both ways, payload checked, byte counts reported. */
static void t_send_recv(struct ctx *t)
{
	const size_t lens[] = {64, 4096, 1u << 20};
	for (size_t i = 0; i < 3; i++) {
		char name[64];
		snprintf(name, sizeof(name), "send_recv_%zub", lens[i]);
		uint64_t seed = 5000 + i, got = 0;
		/* to the peer */
		int rc = rpc(t, CMD_RECV_POST, 0, lens[i] + 100, seed, NULL);
		fill(t->s.arena, lens[i], seed);
		if (rc == 0)
			rc = xrdma_post_send(t->s.conn, seed, 0, lens[i]);
		if (rc == 0)
			rc = xrdma_wait(t->s.conn, seed, OP_TIMEOUT_MS);
		if (rc == 0)
			rc = rpc(t, CMD_RECV_WAIT, 0, 0, seed, &got);
		if (rc == 0 && got != lens[i])
			rc = -EMSGSIZE;
		if (rc == 0)
			rc = rpc(t, CMD_CHECK, 0, lens[i], seed, NULL);
		/* and back */
		if (rc == 0)
			rc = xrdma_post_recv(t->s.conn, seed + 50, 4u << 20, lens[i]);
		if (rc == 0)
			rc = rpc(t, CMD_FILL, 8192, lens[i], seed + 50, NULL);
		if (rc == 0)
			rc = rpc(t, CMD_SEND, 8192, lens[i], seed + 50, NULL);
		struct xrdma_wc wc = {0};
		if (rc == 0) {
			int n = xrdma_poll(t->s.conn, &wc, 1, OP_TIMEOUT_MS);
			rc = n < 0 ? n : wc.status;
		}
		if (rc == 0 && (wc.op != XRDMA_OP_RECV || wc.byte_len != lens[i]))
			rc = -EPROTO;
		if (rc == 0 && check(t->s.arena + (4u << 20), lens[i], seed + 50) >= 0)
			rc = -EBADMSG;
		if (rc)
			result(false, name, "%s (%s)", kvm_strerror(rc),
			       xrdma_conn_error(t->s.conn));
		else
			result(true, name, "both ways, %zu bytes checked", lens[i]);
	}
}

/* Ranges outside either region are refused before anything is posted. */
static void t_range(struct ctx *t)
{
	int a = xrdma_post_read(t->s.conn, 1, 0, ARENA_LEN - 10, 4096);
	int b = xrdma_post_write(t->s.conn, 1, ARENA_LEN - 10, 0, 4096);
	int c = xrdma_conn_check(t->s.conn);
	result(a == -ERANGE && b == -ERANGE && c == 0, "range_checked_before_posting",
	       "remote %d local %d state %d: %s", a, b, c, xrdma_conn_error(t->s.conn));
}

/* A READ with a wrong rkey: a remote access error, promptly, and the QP reported
 * as broken afterwards. */
static void t_bad_rkey(struct ctx *t)
{
	struct cmd c = {.op = CMD_CONNECT};
	struct reply r;
	int rc = write_all(t->fd, &c, sizeof(c));
	if (rc == 0)
		rc = side_connect(&t->s, t->fd, true);
	if (rc == 0)
		rc = read_all(t->fd, &r, sizeof(r));
	if (rc == 0)
		rc = r.status;
	if (rc) {
		result(false, "bad_rkey_remote_access_error", "reconnect: %s", kvm_strerror(rc));
		return;
	}
	int64_t t0 = now_ms();
	rc = xrdma_post_read(t->s.conn, 77, 0, 0, 4096);
	if (rc == 0)
		rc = xrdma_wait(t->s.conn, 77, OP_TIMEOUT_MS);
	int64_t dt = now_ms() - t0;
	char why[XRDMA_ERRLEN];
	snprintf(why, sizeof(why), "%s", xrdma_conn_error(t->s.conn));
	int st = xrdma_conn_check(t->s.conn);
	int again = xrdma_post_read(t->s.conn, 78, 0, 0, 4096);
	bool ok = rc == -EACCES && strstr(why, "remote access") && st == -ECONNRESET &&
	          again == -ECONNRESET;
	result(ok, "bad_rkey_remote_access_error", "rc=%d (%s) in %lld ms; \"%s\"; then %d, %d", rc,
	       kvm_strerror(rc), (long long)dt, why, st, again);
}

/* The peer process dies: our next WRITE fails with a clear error within a deadline
 * (transport retries exhausted) instead of hanging. */
static void t_peer_killed(struct ctx *t)
{
	int rc = rpc(t, CMD_CONNECT, 0, 0, 0, NULL);
	if (rc == 0) {
		fill(t->s.arena, 4096, 9);
		rc = xrdma_post_write(t->s.conn, 90, 0, 0, 4096);
		if (rc == 0)
			rc = xrdma_wait(t->s.conn, 90, OP_TIMEOUT_MS);
	}
	if (rc) {
		result(false, "peer_killed_fails_within_deadline", "set-up: %s (%s)",
		       kvm_strerror(rc), xrdma_conn_error(t->s.conn));
		return;
	}
	struct cmd c = {.op = CMD_DIE};
	char b;
	write_all(t->fd, &c, sizeof(c));
	/* EOF on the control stream: the peer's process, and with it its QP, is gone. */
	while (read(t->fd, &b, 1) > 0)
		;
	if (t->child > 0) {
		waitpid(t->child, NULL, 0);
		t->child = 0;
	}
	/* The control stream may close before the kernel has torn the peer's QP down
	 * (a dying process closes its descriptors one by one; two nodes have no waitpid
	 * to wait for the end), so a WRITE or two may still land: keep writing until
	 * one fails, and require that within the deadline. */
	int64_t t0 = now_ms(), dt = 0;
	int landed = 0;
	for (uint64_t id = 91; rc == 0 && dt < DEATH_DEADLINE_MS; id++) {
		rc = xrdma_post_write(t->s.conn, id, 0, 0, 4096);
		if (rc == 0)
			rc = xrdma_wait(t->s.conn, id, (int)(DEATH_DEADLINE_MS - dt));
		dt = now_ms() - t0;
		landed += rc == 0;
		if (rc == 0)
			usleep(10000);
	}
	char why[XRDMA_ERRLEN];
	snprintf(why, sizeof(why), "%s", xrdma_conn_error(t->s.conn));
	int st = xrdma_conn_check(t->s.conn);
	/* A failed completion (not merely no completion) puts the QP in the error state. */
	bool ok = rc != 0 && st == -ECONNRESET && dt < DEATH_DEADLINE_MS;
	result(ok, "peer_killed_fails_within_deadline",
	       "rc=%d (%s) after %lld ms (%d writes landed first): \"%s\"; then %d", rc,
	       kvm_strerror(rc), (long long)dt, landed, why, st);
}

/* The device is found by its network interface too, and an unknown name is a clear
 * -ENODEV that names it, even where devices exist. */
static void t_open_by_name(struct ctx *t)
{
	char msg[XRDMA_ERRLEN] = "";
	struct xrdma_dev *d = NULL;
	if (g_netdev) {
		int rc = xrdma_dev_open(g_netdev, &d, msg, sizeof(msg));
		bool ok = rc == 0 && strcmp(xrdma_dev_name(d), xrdma_dev_name(t->s.dev)) == 0 &&
		          xrdma_dev_gid_index(d) == xrdma_dev_gid_index(t->s.dev);
		result(ok, "open_by_interface", "%s -> %s (%s)", g_netdev,
		       rc ? "-" : xrdma_dev_name(d), rc ? msg : kvm_strerror(rc));
		xrdma_dev_close(d);
		d = NULL;
	}
	int rc = xrdma_dev_open("kvmesh-no-such-dev9", &d, msg, sizeof(msg));
	result(rc == -ENODEV && !d && strstr(msg, "kvmesh-no-such-dev9"),
	       "open_unknown_name_enodev", "rc=%d: %s", rc, msg);
}

static int run_client(int fd, const char *devname, pid_t child)
{
	struct ctx t = {.fd = fd, .child = child};
	if (side_open(&t.s, devname) != 0) {
		result(false, "open_device", "cannot open the RDMA device");
		goto out;
	}
	result(true, "open_device", "%s, RoCEv2 GID index %d, arena %u MB registered once",
	       xrdma_dev_name(t.s.dev), xrdma_dev_gid_index(t.s.dev), ARENA_LEN >> 20);
	t_open_by_name(&t);
	int rc = rpc(&t, CMD_CONNECT, 0, 0, 0, NULL);
	result(rc == 0, "connect_rc_qp", rc ? "%s (%s)" : NULL, kvm_strerror(rc),
	       t.s.conn ? xrdma_conn_error(t.s.conn) : "");
	if (rc == 0) {
		t_write(&t);
		t_read(&t);
		t_pipelined(&t);
		t_event_loop(&t);
		t_send_recv(&t);
		t_range(&t);
		t_bad_rkey(&t);
		t_peer_killed(&t);
	}
	side_close(&t.s);
out:
	if (t.child > 0) {
		struct cmd c = {.op = CMD_BYE};
		write_all(fd, &c, sizeof(c));
		waitpid(t.child, NULL, 0);
	}
	close(fd);
	printf("%d passed, %d failed\n", g_passed, g_failed);
	return g_failed || !g_passed ? 1 : 0;
}

/* --- main -------------------------------------------------------------------------- */

static int tcp_serve(int port, const char *devname)
{
	int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) || listen(ls, 1)) {
		perror("test_rdma_verbs: listen");
		return 1;
	}
	int fd = accept(ls, NULL, NULL);
	close(ls);
	if (fd < 0) {
		perror("test_rdma_verbs: accept");
		return 1;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return serve(fd, devname);
}

static int tcp_connect(const char *spec)
{
	char host[64];
	int port;
	if (sscanf(spec, "%63[^:]:%d", host, &port) != 2)
		return -EINVAL;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (inet_pton(AF_INET, host, &a.sin_addr) != 1)
		return -EINVAL;
	/* The peer may still be starting: retry for up to 20 s. */
	for (int i = 0; i < 200; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
		if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0) {
			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			return fd;
		}
		close(fd);
		usleep(100000);
	}
	return -ECONNREFUSED;
}

int main(int argc, char **argv)
{
	const char *dev = NULL, *connect_to = NULL;
	int serve_port = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--dev") && i + 1 < argc)
			dev = argv[++i];
		else if (!strcmp(argv[i], "--serve") && i + 1 < argc)
			serve_port = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--connect") && i + 1 < argc)
			connect_to = argv[++i];
		else if (!strcmp(argv[i], "--tag") && i + 1 < argc)
			g_tag = argv[++i];
		else if (!strcmp(argv[i], "--netdev") && i + 1 < argc)
			g_netdev = argv[++i];
		else {
			fprintf(stderr,
			        "usage: %s [--dev NAME] [--netdev IFACE] [--tag T]\n"
			        "          [--serve PORT | --connect IP:PORT]\n",
			        argv[0]);
			return 2;
		}
	}
	/* A peer that dies must not kill us through a write on the control stream. */
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);

	if (serve_port)
		return tcp_serve(serve_port, dev);

	/* Look for a device before forking (and close it again: verbs resources must
	 * not cross a fork), so that a machine without RDMA gets a clear skip. */
	struct xrdma_dev *probe;
	char msg[XRDMA_ERRLEN] = "";
	int rc = xrdma_dev_open(dev, &probe, msg, sizeof(msg));
	if (rc == -ENODEV) {
		printf("SKIP: %s\n", msg);
		printf("0 passed, 0 failed (skipped: no RDMA device present)\n");
		return EXIT_SKIP;
	}
	if (rc) {
		printf("[%s] FAIL open_device: %s (%s)\n0 passed, 1 failed\n", g_tag, msg,
		       kvm_strerror(rc));
		return 1;
	}
	xrdma_dev_close(probe);

	if (connect_to) {
		g_tag = strcmp(g_tag, "one-node") ? g_tag : "two-node";
		int fd = tcp_connect(connect_to);
		if (fd < 0) {
			printf("[%s] FAIL control_connect: %s: %s\n0 passed, 1 failed\n", g_tag,
			       connect_to, kvm_strerror(fd));
			return 1;
		}
		return run_client(fd, dev, 0);
	}

	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
		perror("socketpair");
		return 1;
	}
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		close(sv[0]);
		_exit(serve(sv[1], dev));
	}
	close(sv[1]);
	return run_client(sv[0], dev, pid);
}
