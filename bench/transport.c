/* make bench-transport: the TCP data plane on loopback against the physical
 * limit and against Redis, in the same run.
 *
 *  (a) raw: a plain socket blast of the same bytes (block-sized writes from
 *      one thread, reads into one block-sized buffer on another), one
 *      connection, the same socket options (TCP_NODELAY, 4 MiB buffers);
 *  (b) kvmesh GET_BLOCKS throughput for 64 KB, 512 KB and 2 MB blocks, a
 *      window of requests pipelined on one connection (and on two);
 *  (c) Redis (redis-server started here on a loopback port) GETting values
 *      of the same sizes with hiredis, pipelined with the same window;
 *  (d) p50/p99 latency of one 64 KB block, one request at a time, for
 *      kvmesh and Redis.
 * Each contender runs in ROUNDS short rounds back to back; figures are
 * medians, ratios are medians of per-round ratios (robust to a machine
 * whose load drifts). Final lines are name=value.
 * KVMESH_BENCH_MB sets the bytes per contender and block size (default 448);
 * KVMESH_BENCH_NO_CACHED_CSUM=1 makes the server hash every block it sends. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "transport/transport.h"

#define WINDOW 16
#define NBLOCKS 32
#define SOCKBUF (4 << 20)

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

#define ROUNDS 7

/* Median of n values (sorts a copy). */
static double median(const double *x, int n)
{
	double v[ROUNDS];
	memcpy(v, x, sizeof(double) * (size_t)n);
	qsort(v, (size_t)n, sizeof v[0], cmp_d);
	return v[n / 2];
}

static void sockopts(int fd)
{
	int one = 1, sz = SOCKBUF;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
}

/* ---- (a) raw blast ------------------------------------------------------------ */

struct blast {
	int lfd;
	size_t block;
	uint64_t total;
	const uint8_t *src; /* NBLOCKS blocks: the same memory kvmesh serves from */
};

static void *blast_sender(void *arg)
{
	struct blast *b = arg;
	int fd = accept(b->lfd, NULL, NULL);
	sockopts(fd);
	for (uint64_t sent = 0, k = 0; sent < b->total; k++) {
		size_t n = b->block;
		const uint8_t *buf = b->src + (k % NBLOCKS) * b->block;
		size_t off = 0;
		while (off < n) {
			ssize_t w = write(fd, buf + off, n - off);
			if (w <= 0)
				goto out;
			off += (size_t)w;
		}
		sent += n;
	}
out:
	close(fd);
	return NULL;
}

static double raw_blast(const uint8_t *src, uint8_t *ring, size_t block, uint64_t total)
{
	struct blast b = {.block = block, .total = total, .src = src};
	b.lfd = socket(AF_INET, SOCK_STREAM, 0);
	sockopts(b.lfd);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	bind(b.lfd, (struct sockaddr *)&a, sizeof a);
	listen(b.lfd, 1);
	socklen_t l = sizeof a;
	getsockname(b.lfd, (struct sockaddr *)&a, &l);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	sockopts(fd);
	pthread_t th;
	pthread_create(&th, NULL, blast_sender, &b);
	if (connect(fd, (struct sockaddr *)&a, sizeof a))
		return 0;
	/* Received into the WINDOW block buffers in turn, as kvmesh's pipeline does. */
	uint8_t *buf = ring;
	double t0 = now_s();
	uint64_t got = 0;
	for (uint64_t k = 0; got < total; k++) {
		uint8_t *dst = buf + (k % WINDOW) * block;
		size_t off = 0;
		while (off < block && got < total) {
			/* MSG_WAITALL: one call per block, the fewest wake-ups. */
			ssize_t r = recv(fd, dst + off, block - off, MSG_WAITALL);
			if (r <= 0)
				goto done;
			off += (size_t)r;
			got += (uint64_t)r;
		}
	}
done:;
	double dt = now_s() - t0;
	pthread_join(th, NULL);
	close(fd);
	close(b.lfd);
	return (double)got / dt / 1e9;
}

/* ---- kvmesh server with a static block map ---------------------------------------- */

/* The served blocks and, as a store keeps them, one XXH3 per block
 * (computed once here; a GET of a whole block is then not hashed again by
 * the server, only verified by the client). */
struct blocks {
	uint8_t *mem;
	size_t block;
	uint64_t csum[NBLOCKS];
	int use_csum;
};

static int h_get(void *ctx, const wire_block_ref *r, const void **data, void **pin, uint64_t *csum)
{
	struct blocks *b = ctx;
	if (r->h.slot >= NBLOCKS)
		return -ENOENT;
	if ((uint64_t)r->offset + r->len > b->block)
		return -ERANGE;
	*data = b->mem + (size_t)r->h.slot * b->block + r->offset;
	*pin = NULL;
	if (b->use_csum && r->offset == 0 && r->len == b->block)
		*csum = b->csum[r->h.slot];
	return 0;
}

/* Pipelined GETs driven from completions: each callback submits the next
 * request until `total` bytes were requested. */
struct pipe {
	xport_peer *p;
	size_t block;
	uint64_t issued, total;
	atomic_uint_fast64_t done_bytes;
	uint8_t *dst; /* WINDOW destination buffers */
	xport_block_io io[WINDOW];
	struct slotarg {
		struct pipe *pp;
		int i;
	} args[WINDOW];
	atomic_int errors;
	xport_waiter w;
};

static void pipe_cb(void *arg, int status);

static void pipe_issue(struct pipe *pp, int i)
{
	pp->io[i] = (xport_block_io){.ref = {{(uint32_t)(pp->issued / pp->block) % NBLOCKS, 1, 0}, 0, (uint32_t)pp->block},
				     .buf = pp->dst + (size_t)i * pp->block};
	pp->issued += pp->block;
	if (xport_get_blocks(pp->p, &pp->io[i], 1, 30000, pipe_cb, &pp->args[i])) {
		atomic_fetch_add(&pp->errors, 1);
		xport_waiter_cb(&pp->w, -EIO);
	}
}

static void pipe_cb(void *arg, int status)
{
	struct slotarg *sa = arg;
	struct pipe *pp = sa->pp;
	if (status || pp->io[sa->i].status)
		atomic_fetch_add(&pp->errors, 1);
	atomic_fetch_add(&pp->done_bytes, pp->block);
	/* Callbacks of one peer run on its loop thread: issued is not shared. */
	if (pp->issued < pp->total) {
		xport_waiter_add(&pp->w, 1);
		pipe_issue(pp, sa->i);
	}
	xport_waiter_cb(&pp->w, status);
}

static xport_peer *kv_connect(xport_loop *cl, uint16_t port, uint32_t conns, int csum)
{
	xport_opts o;
	xport_opts_default(&o);
	o.n_conns = conns;
	o.bulk_checksum = csum;
	o.sockbuf_bytes = SOCKBUF;
	xport_peer *p = NULL;
	if (xport_tcp_connect(cl, "127.0.0.1", port, &o, &p))
		return NULL;
	return p;
}

static double kv_throughput(xport_loop *cl, uint8_t *ring, uint16_t port, size_t block, uint64_t total, uint32_t conns,
			    int csum)
{
	xport_peer *p = kv_connect(cl, port, conns, csum);
	if (!p)
		return 0;
	struct pipe *pp = calloc(1, sizeof *pp);
	pp->p = p;
	pp->block = block;
	pp->total = total;
	pp->dst = ring; /* the same WINDOW buffers the raw blast reads into */
	xport_waiter_init(&pp->w);
	double t0 = now_s();
	xport_waiter_add(&pp->w, WINDOW);
	/* The first window is issued from here; later requests from callbacks,
	 * which run on the loop thread. Hand the first window to the loop too, so
	 * `issued` is touched by one thread only: issue before any completes. */
	for (int i = 0; i < WINDOW; i++) {
		pp->args[i] = (struct slotarg){pp, i};
	}
	pp->issued = (uint64_t)WINDOW * block;
	for (int i = 0; i < WINDOW; i++) {
		pp->io[i] = (xport_block_io){.ref = {{(uint32_t)i % NBLOCKS, 1, 0}, 0, (uint32_t)block},
					     .buf = pp->dst + (size_t)i * block};
	}
	for (int i = 0; i < WINDOW; i++)
		if (xport_get_blocks(p, &pp->io[i], 1, 30000, pipe_cb, &pp->args[i]))
			xport_waiter_cb(&pp->w, -EIO);
	int rc = xport_waiter_wait(&pp->w);
	double dt = now_s() - t0;
	double gbs = (double)atomic_load(&pp->done_bytes) / dt / 1e9;
	if (rc || atomic_load(&pp->errors))
		fprintf(stderr, "kvmesh GET errors: rc=%d errors=%d\n", rc, atomic_load(&pp->errors));
	xport_waiter_destroy(&pp->w);
	xport_close(p);
	free(pp);
	return gbs;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void kv_latency(xport_loop *cl, uint16_t port, int iters, double *p50, double *p99)
{
	xport_peer *p = kv_connect(cl, port, 1, 1);
	uint8_t *dst = malloc(65536);
	uint64_t *lat = malloc(sizeof *lat * (size_t)iters);
	xport_waiter w;
	xport_waiter_init(&w);
	for (int i = -100; i < iters; i++) {
		xport_block_io io = {.ref = {{(uint32_t)(i & 7), 1, 0}, 0, 65536}, .buf = dst};
		double t0 = now_s();
		xport_waiter_add(&w, 1);
		xport_get_blocks(p, &io, 1, 5000, xport_waiter_cb, &w);
		xport_waiter_wait(&w);
		if (i >= 0)
			lat[i] = (uint64_t)((now_s() - t0) * 1e9);
	}
	qsort(lat, (size_t)iters, sizeof *lat, cmp_u64);
	*p50 = (double)lat[iters / 2] / 1000.0;
	*p99 = (double)lat[iters * 99 / 100] / 1000.0;
	xport_waiter_destroy(&w);
	xport_close(p);
	free(lat);
	free(dst);
}

/* The same from the loop thread: each completion issues the next request
 * (how the node agent drives the transport), so no application-thread
 * wake-ups are counted. */
struct chain {
	xport_peer *p;
	uint8_t *dst;
	xport_block_io io;
	int i, iters;
	double t0;
	uint64_t *lat;
	xport_waiter w;
};

static void chain_cb(void *arg, int status)
{
	struct chain *c = arg;
	double t = now_s();
	(void)status;
	if (c->i >= 0)
		c->lat[c->i] = (uint64_t)((t - c->t0) * 1e9);
	if (++c->i < c->iters) {
		c->io = (xport_block_io){.ref = {{(uint32_t)(c->i & 7), 1, 0}, 0, 65536}, .buf = c->dst};
		c->t0 = now_s();
		if (xport_get_blocks(c->p, &c->io, 1, 5000, chain_cb, c) == 0)
			return;
	}
	xport_waiter_cb(&c->w, 0);
}

static void kv_latency_chained(xport_loop *cl, uint16_t port, int iters, double *p50, double *p99)
{
	struct chain c = {.p = kv_connect(cl, port, 1, 1), .dst = malloc(65536), .i = -101, .iters = iters};
	c.lat = malloc(sizeof *c.lat * (size_t)iters);
	xport_waiter_init(&c.w);
	xport_waiter_add(&c.w, 1);
	c.io = (xport_block_io){.ref = {{0, 1, 0}, 0, 65536}, .buf = c.dst};
	c.t0 = now_s();
	xport_get_blocks(c.p, &c.io, 1, 5000, chain_cb, &c);
	xport_waiter_wait(&c.w);
	qsort(c.lat, (size_t)iters, sizeof *c.lat, cmp_u64);
	*p50 = (double)c.lat[iters / 2] / 1000.0;
	*p99 = (double)c.lat[iters * 99 / 100] / 1000.0;
	xport_waiter_destroy(&c.w);
	xport_close(c.p);
	free(c.lat);
	free(c.dst);
}

/* ---- (c) Redis ------------------------------------------------------------------- */

static pid_t redis_start(int port)
{
	pid_t pid = fork();
	if (pid == 0) {
		char ps[16];
		snprintf(ps, sizeof ps, "%d", port);
		int devnull = open("/dev/null", 1);
		dup2(devnull, 1);
		execlp("redis-server", "redis-server", "--port", ps, "--bind", "127.0.0.1", "--save", "", "--appendonly",
		       "no", "--protected-mode", "no", "--io-threads", "1", (char *)NULL);
		_exit(127);
	}
	return pid;
}

static redisContext *redis_connect(int port)
{
	for (int i = 0; i < 200; i++) {
		redisContext *c = redisConnect("127.0.0.1", port);
		if (c && !c->err) {
			redisReply *r = redisCommand(c, "PING");
			if (r) {
				freeReplyObject(r);
				return c;
			}
		}
		if (c)
			redisFree(c);
		usleep(20000);
	}
	return NULL;
}

static int redis_load(redisContext *c, size_t block)
{
	uint8_t *v = malloc(block);
	memset(v, 0x3c, block);
	for (int i = 0; i < NBLOCKS; i++) {
		redisReply *r = redisCommand(c, "SET k%d %b", i, v, block);
		if (!r)
			return -1;
		freeReplyObject(r);
	}
	free(v);
	return 0;
}

static double redis_throughput(redisContext *c, size_t block, uint64_t total)
{
	uint64_t n = total / block, sent = 0, got = 0, bytes = 0;
	uint8_t *dst = malloc(block);
	double t0 = now_s();
	while (got < n) {
		while (sent < n && sent - got < WINDOW) {
			redisAppendCommand(c, "GET k%d", (int)(sent % NBLOCKS));
			sent++;
		}
		redisReply *r;
		if (redisGetReply(c, (void **)&r) != REDIS_OK)
			break;
		/* The caller wants the bytes in its buffer, as kvmesh delivers them. */
		if (r->type == REDIS_REPLY_STRING) {
			memcpy(dst, r->str, r->len);
			bytes += r->len;
		}
		freeReplyObject(r);
		got++;
	}
	double dt = now_s() - t0;
	free(dst);
	return (double)bytes / dt / 1e9;
}

static void redis_latency(redisContext *c, int iters, double *p50, double *p99)
{
	uint64_t *lat = malloc(sizeof *lat * (size_t)iters);
	uint8_t *dst = malloc(65536);
	for (int i = -100; i < iters; i++) {
		double t0 = now_s();
		redisReply *r = redisCommand(c, "GET k%d", i & 7);
		if (r && r->type == REDIS_REPLY_STRING)
			memcpy(dst, r->str, r->len);
		if (r)
			freeReplyObject(r);
		if (i >= 0)
			lat[i] = (uint64_t)((now_s() - t0) * 1e9);
	}
	qsort(lat, (size_t)iters, sizeof *lat, cmp_u64);
	*p50 = (double)lat[iters / 2] / 1000.0;
	*p99 = (double)lat[iters * 99 / 100] / 1000.0;
	free(lat);
	free(dst);
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN);
	if (!getenv("KVMESH_LOG_LEVEL"))
		setenv("KVMESH_LOG_LEVEL", "warn", 1);
	const char *e = getenv("KVMESH_BENCH_MB");
	uint64_t total = (uint64_t)(e ? atoi(e) : 448) << 20;
	int iters = 3000;
	static const size_t sizes[3] = {64u << 10, 512u << 10, 2u << 20};
	static const char *names[3] = {"64k", "512k", "2mb"};
	double raw[3], kv[3], kv2[3], kvn[3], rd[3] = {0, 0, 0}, lat_ratio = 0, lat_ratio_loop = 0;
	double ratio_raw[3], ratio_nocsum[3], ratio_redis[3];

	xport_loop *sl, *cl;
	if (xport_loop_create(&sl) || xport_loop_create(&cl))
		return 1;
	struct blocks bl = {.mem = NULL};
	xport_handlers h = {.get = h_get};
	xport_opts so;
	xport_opts_default(&so);
	so.sockbuf_bytes = SOCKBUF;

	int rport = 20000 + (int)(getpid() % 20000);
	pid_t rpid = redis_start(rport);
	redisContext *rc = redis_connect(rport);
	if (!rc)
		fprintf(stderr, "redis: could not start redis-server on port %d; Redis figures skipped\n", rport);

	printf("# kvmesh transport benchmark, loopback, window=%d, %d rounds of %llu MiB, medians\n", WINDOW, ROUNDS,
	       (unsigned long long)(total / ROUNDS >> 20));
	printf("# %-6s %10s %10s %10s %10s %10s   (GB/s)\n", "block", "raw", "kv_1conn", "kv_2conn", "kv_nocsum", "redis");
	for (int s = 0; s < 3; s++) {
		size_t block = sizes[s];
		bl.mem = malloc(NBLOCKS * block);
		for (size_t i = 0; i < NBLOCKS * block; i++)
			bl.mem[i] = (uint8_t)(i * 31);
		bl.block = block;
		for (int i = 0; i < NBLOCKS; i++) {
			struct iovec v = {bl.mem + (size_t)i * block, block};
			bl.csum[i] = wire_csum_iov(&v, 1);
		}
		bl.use_csum = getenv("KVMESH_BENCH_NO_CACHED_CSUM") == NULL;
		so.bulk_checksum = 1;
		xport_server *srv, *srv_nocsum;
		if (xport_tcp_listen(sl, "127.0.0.1", 0, &so, &h, &bl, &srv))
			return 1;
		so.bulk_checksum = 0;
		if (xport_tcp_listen(sl, "127.0.0.1", 0, &so, &h, &bl, &srv_nocsum))
			return 1;
		/* ROUNDS short rounds, each running every contender back to back;
		 * the ratios are taken per round (so load that drifts between rounds
		 * cancels out) and the medians reported. */
		double r[ROUNDS], k[ROUNDS], k2[ROUNDS], kn[ROUNDS], d[ROUNDS], qr[ROUNDS], qn[ROUNDS], qd[ROUNDS];
		if (rc)
			redis_load(rc, block);
		/* One destination ring for everyone, faulted in once. */
		uint8_t *ring = malloc((size_t)WINDOW * block);
		memset(ring, 0, (size_t)WINDOW * block);
		uint64_t slice = total / ROUNDS;
		for (int rep = 0; rep < ROUNDS; rep++) {
			r[rep] = raw_blast(bl.mem, ring, block, slice);
			k[rep] = kv_throughput(cl, ring, srv->port, block, slice, 1, 1);
			k2[rep] = kv_throughput(cl, ring, srv->port, block, slice, 2, 1);
			kn[rep] = kv_throughput(cl, ring, srv_nocsum->port, block, slice, 1, 0);
			d[rep] = rc ? redis_throughput(rc, block, slice / 4) : 0;
			qr[rep] = k[rep] / r[rep];
			qn[rep] = kn[rep] / r[rep];
			qd[rep] = d[rep] > 0 ? k[rep] / d[rep] : 0;
		}
		raw[s] = median(r, ROUNDS);
		kv[s] = median(k, ROUNDS);
		kv2[s] = median(k2, ROUNDS);
		kvn[s] = median(kn, ROUNDS);
		rd[s] = median(d, ROUNDS);
		ratio_raw[s] = median(qr, ROUNDS);
		ratio_nocsum[s] = median(qn, ROUNDS);
		ratio_redis[s] = median(qd, ROUNDS);
		free(ring);
		printf("# %-6s %10.2f %10.2f %10.2f %10.2f %10.2f\n", names[s], raw[s], kv[s], kv2[s], kvn[s], rd[s]);
		fflush(stdout);
		if (s == 0) {
			double kp50, kp99, cp50, cp99, rp50 = 0, rp99 = 0;
			kv_latency(cl, srv->port, iters, &kp50, &kp99);
			kv_latency_chained(cl, srv->port, iters, &cp50, &cp99);
			if (rc)
				redis_latency(rc, iters, &rp50, &rp99);
			printf("latency_64k_p50_us_kvmesh=%.1f\nlatency_64k_p99_us_kvmesh=%.1f\n", kp50, kp99);
			printf("latency_64k_p50_us_kvmesh_loop=%.1f\nlatency_64k_p99_us_kvmesh_loop=%.1f\n", cp50, cp99);
			printf("latency_64k_p50_us_redis=%.1f\nlatency_64k_p99_us_redis=%.1f\n", rp50, rp99);
			if (rc) {
				lat_ratio = kp50 / rp50;
				lat_ratio_loop = cp50 / rp50;
			}
		}
		xport_server_close(srv);
		xport_server_close(srv_nocsum);
		free(bl.mem);
	}
	for (int s = 0; s < 3; s++) {
		printf("raw_gbps_%s=%.2f\nget_gbps_%s=%.2f\nget_2conn_gbps_%s=%.2f\nget_nocsum_gbps_%s=%.2f\n", names[s], raw[s],
		       names[s], kv[s], names[s], kv2[s], names[s], kvn[s]);
		if (rc)
			printf("redis_gbps_%s=%.2f\n", names[s], rd[s]);
	}
	for (int s = 0; s < 2; s++)
		printf("transport_vs_raw_%s=%.3f\n", names[s], ratio_raw[s]);
	printf("transport_nocsum_vs_raw_2mb=%.3f\n", ratio_nocsum[2]);
	printf("transport_vs_raw_2mb=%.3f\n", ratio_raw[2]);
	if (rc) {
		printf("transport_vs_redis_2mb=%.3f\n", ratio_redis[2]);
		printf("transport_p50_64k_loop_vs_redis=%.3f\n", lat_ratio_loop);
		printf("transport_p50_64k_vs_redis=%.3f\n", lat_ratio);
	}
	if (rc)
		redisFree(rc);
	if (rpid > 0) {
		kill(rpid, SIGTERM);
		waitpid(rpid, NULL, 0);
	}
	xport_loop_destroy(cl);
	xport_loop_destroy(sl);
	return 0;
}
