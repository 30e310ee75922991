/* Tests of the RDMA backend of the data plane (transport/rdma_xport.h) between two
 * processes: GET_BLOCKS by RDMA READ and PUT_BLOCKS by RDMA WRITE, verified byte for
 * byte, many requests in flight, stale and bad handles refused, a killed peer.
 *
 * A plain program like test_rdma_verbs (same options, same last line "N passed, N
 * failed"), run inside the emulated machine of `make test-rdma`:
 *   test_rdma_xport [--dev NAME]                   one node: forks a server on the same device
 *   test_rdma_xport --serve PORT [--dev NAME]      the server (a toy store over one arena)
 *   test_rdma_xport --connect IP:PORT [--dev NAME] two nodes: tests against that server
 *   --netdev IFACE, --tag T: as test_rdma_verbs
 * The client steers the server with APPEND_KV entries on test arenas (over the TCP
 * channel): 100 = die (SIGKILL), 101 = check bytes, 102 = bump a slot's generation.
 * Exit status: 0 all passed, 1 something failed, 77 skipped (no RDMA device here). */
#include "common/kvm_error.h"
#include "transport/rdma_xport.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SLOT_BYTES    (8u << 20) /* blocks up to 8 MB */
#define N_SLOTS       4
#define ARENA_ID      0
#define CLIENT_LEN    (24u << 20)
#define OP_TIMEOUT_MS 30000 /* in emulation: generous */
#define DEATH_MS      10000 /* requests against a killed peer must end within this */
#define ONE_NODE_PORT 7472
#define EXIT_SKIP     77
enum { T_DIE = 100, T_CHECK = 101, T_BUMP = 102, T_KV = 103 };
/* ATTEND shapes the test server treats specially: head_dim DEFER_DIM is computed
 * on another thread (deferred), HANG_DIM is deferred and never completed. */
#define DEFER_DIM 24
#define HANG_DIM  40

static const char *g_tag = "one-node";
static const char *g_netdev;
static int g_passed, g_failed;

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	return x ^ (x >> 33);
}

/* Byte `pos` of the pattern `seed`: any sub-range can be checked on its own. */
static uint8_t pat(uint64_t seed, uint64_t pos)
{
	return (uint8_t)(mix(seed * 0x9E3779B97F4A7C15ull + pos / 8) >> (8 * (pos % 8)));
}

static void fill(uint8_t *p, uint64_t len, uint64_t seed, uint64_t start)
{
	for (uint64_t i = 0; i < len; i++)
		p[i] = pat(seed, start + i);
}

/* Returns the first mismatching index, or -1. */
static long check(const uint8_t *p, uint64_t len, uint64_t seed, uint64_t start)
{
	for (uint64_t i = 0; i < len; i++)
		if (p[i] != pat(seed, start + i))
			return (long)i;
	return -1;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void result(bool ok, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void result(bool ok, const char *name, const char *fmt, ...)
{
	char buf[512] = "";
	if (fmt) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(buf, sizeof(buf), fmt, ap);
		va_end(ap);
	}
	printf("[%s] %s %s%s%s\n", g_tag, ok ? "PASS" : "FAIL", name, buf[0] ? ": " : "", buf);
	if (ok)
		g_passed++;
	else
		g_failed++;
}

/* ---- the server: a toy store over one registered arena ------------------------ */

struct store {
	uint8_t *base;
	uint32_t gen[N_SLOTS];
	long pins;
};

static int store_ref(struct store *s, const wire_block_ref *r, uint8_t **p)
{
	if (r->h.arena != ARENA_ID || r->h.slot >= N_SLOTS)
		return -ENOENT;
	if (r->h.gen != s->gen[r->h.slot])
		return -ESTALE;
	if (r->offset > SLOT_BYTES || r->len > SLOT_BYTES - r->offset)
		return -ERANGE;
	*p = s->base + (uint64_t)r->h.slot * SLOT_BYTES + r->offset;
	return 0;
}

static int h_get(void *ctx, const wire_block_ref *r, const void **data, void **pin, uint64_t *csum)
{
	(void)csum;
	struct store *s = ctx;
	uint8_t *p;
	int rc = store_ref(s, r, &p);
	if (rc)
		return rc;
	s->pins++;
	*data = p;
	*pin = s;
	return 0;
}

static void h_unpin(void *ctx, void *pin)
{
	(void)pin;
	((struct store *)ctx)->pins--;
}

/* Writes land in place: a toy store (a real one stages them until commit). */
static int h_put_prepare(void *ctx, const wire_block_ref *r, void **dst, void **txn)
{
	uint8_t *p;
	int rc = store_ref(ctx, r, &p);
	if (rc)
		return rc;
	*dst = p;
	*txn = ctx;
	return 0;
}

static int h_put_commit(void *ctx, const wire_block_ref *r, void *txn, int status, uint64_t csum)
{
	(void)ctx, (void)r, (void)txn, (void)status, (void)csum;
	return 0;
}

static int h_append(void *ctx, const wire_append_ref *r, const void *k, const void *v)
{
	(void)v;
	struct store *s = ctx;
	uint64_t seed;
	switch (r->h.arena) {
	case T_DIE:
		fflush(NULL);
		raise(SIGKILL);
		return 0;
	case T_CHECK:
		if (r->h.slot >= N_SLOTS || r->bytes != 8 || r->layer > SLOT_BYTES || r->token > SLOT_BYTES - r->layer)
			return -EINVAL;
		memcpy(&seed, k, 8);
		return check(s->base + (uint64_t)r->h.slot * SLOT_BYTES + r->layer, r->token, seed, r->layer) < 0
		               ? 0
		               : -EBADMSG;
	case T_BUMP:
		if (r->h.slot >= N_SLOTS)
			return -EINVAL;
		s->gen[r->h.slot]++;
		return 0;
	case T_KV: /* k and v must be the patterns of seeds layer and layer + 1 */
		return check(k, r->bytes, r->layer, 0) < 0 && check(v, r->bytes, r->layer + 1, 0) < 0 ? 0 : -EBADMSG;
	default: return -ENOSYS;
	}
}

/* The reference ATTEND both sides compute: per query, o = 2 q + n_tokens + the sum
 * of its block handles' slots and generations, lse[h] = n_tokens / 2 + h; a query
 * with no tokens fails alone with -EINVAL. */
static int attend_ref_one(uint32_t qh, uint32_t hd, uint32_t n_tokens, uint64_t hsum, const float *q, float *o,
                          float *lse)
{
	if (n_tokens == 0)
		return -EINVAL;
	for (uint32_t h = 0; h < qh; h++) {
		for (uint32_t d = 0; d < hd; d++)
			o[h * hd + d] = 2 * q[h * hd + d] + (float)n_tokens + (float)hsum;
		lse[h] = (float)n_tokens / 2 + (float)h;
	}
	return 0;
}

static void attend_ref(const wire_attend_view *v, const float *q, float *o, float *lse, int *st)
{
	uint32_t qh = v->shape.q_heads, hd = v->shape.head_dim;
	const uint8_t *cur = v->queries;
	wire_attend_query aq;
	for (uint32_t i = 0; wire_attend_next(v, &cur, &aq) == 0; i++) {
		uint64_t hsum = 0;
		for (uint32_t b = 0; b < aq.n_blocks; b++) {
			wire_handle h;
			wire_attend_handle(&aq, b, &h);
			hsum += h.slot + h.gen;
		}
		size_t qo = (size_t)i * qh * hd;
		st[i] = attend_ref_one(qh, hd, aq.n_tokens, hsum, q + qo, o + qo, lse + (size_t)i * qh);
	}
}

struct deferred {
	const wire_attend_view *v;
	const float *q;
	float *o, *lse;
	int *st;
	xport_attend_token *tok;
};

static void *defer_thread(void *arg)
{
	struct deferred *d = arg;
	usleep(20 * 1000);
	attend_ref(d->v, d->q, d->o, d->lse, d->st);
	xport_attend_complete(d->tok, 0);
	free(d);
	return NULL;
}

static int h_attend(void *ctx, const wire_attend_view *v, const float *q, float *o, float *lse, int *st,
                    xport_attend_token *tok)
{
	(void)ctx;
	if (v->shape.head_dim == HANG_DIM)
		return XPORT_DEFERRED; /* never completed: the client must not hang on it */
	if (v->shape.head_dim != DEFER_DIM) {
		attend_ref(v, q, o, lse, st);
		return 0;
	}
	struct deferred *d = malloc(sizeof(*d));
	pthread_t th;
	if (!d)
		return -ENOMEM;
	*d = (struct deferred){v, q, o, lse, st, tok};
	if (pthread_create(&th, NULL, defer_thread, d)) {
		free(d);
		return -EAGAIN;
	}
	pthread_detach(th);
	return XPORT_DEFERRED;
}

static int serve(int port, const char *devname, int ready_fd)
{
	struct xrdma_dev *dev = NULL;
	struct xrdma_mr *mr = NULL;
	xport_loop *l = NULL;
	xport_server *srv = NULL;
	struct store st = {0};
	char msg[XRDMA_ERRLEN] = "";
	int rc = xrdma_dev_open(devname, &dev, msg, sizeof(msg));
	if (rc) {
		fprintf(stderr, "serve: open %s: %s\n", devname ? devname : "(any)", msg);
		return 1;
	}
	st.base = mmap(NULL, (size_t)N_SLOTS * SLOT_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (st.base == MAP_FAILED)
		goto clean_dev;
	for (uint32_t s = 0; s < N_SLOTS; s++) {
		fill(st.base + (uint64_t)s * SLOT_BYTES, SLOT_BYTES, s + 1, 0);
		st.gen[s] = 1;
	}
	rc = xrdma_mr_reg(dev, st.base, (size_t)N_SLOTS * SLOT_BYTES, &mr);
	if (rc) {
		fprintf(stderr, "serve: register: %s\n", xrdma_dev_error(dev));
		goto clean_map;
	}
	if ((rc = xport_loop_create(&l)))
		goto clean_mr;
	xport_opts o;
	xport_opts_default(&o);
	o.node_id = 2;
	xport_handlers h = {.get = h_get,
	                    .unpin = h_unpin,
	                    .put_prepare = h_put_prepare,
	                    .put_commit = h_put_commit,
	                    .append = h_append,
	                    .attend = h_attend};
	xport_rdma_cfg cfg = {.dev = dev, .mr = mr, .slot_bytes = SLOT_BYTES, .arena = ARENA_ID};
	rc = xport_rdma_listen(l, ready_fd >= 0 ? "127.0.0.1" : "0.0.0.0", (uint16_t)port, &o, &cfg, &h, &st, &srv);
	if (rc) {
		fprintf(stderr, "serve: listen: %s\n", kvm_strerror(rc));
		goto clean_loop;
	}
	fprintf(stderr, "serve: listening on port %u, device %s\n", srv->port, xrdma_dev_name(dev));
	if (ready_fd >= 0) {
		char c = 1;
		if (write(ready_fd, &c, 1) != 1)
			goto clean_srv;
		close(ready_fd);
	}
	/* Until the client kills us (T_DIE) or the guest's timeout does. */
	for (;;)
		pause();
clean_srv:
	xport_server_close(srv);
clean_loop:
	xport_loop_destroy(l);
clean_mr:
	xrdma_mr_dereg(mr);
clean_map:
	munmap(st.base, (size_t)N_SLOTS * SLOT_BYTES);
clean_dev:
	xrdma_dev_close(dev);
	return 1;
}

/* ---- the client ---------------------------------------------------------------- */

struct ctx {
	xport_loop *l;
	xport_peer *p;
	uint8_t *buf; /* CLIENT_LEN bytes, registered */
	uint32_t gen[N_SLOTS];
};

static wire_block_ref ref_of(struct ctx *t, uint32_t slot, uint32_t off, uint32_t len)
{
	return (wire_block_ref){.h = {.slot = slot, .gen = slot < N_SLOTS ? t->gen[slot] : 1, .arena = ARENA_ID},
	                        .offset = off,
	                        .len = len};
}

/* One blocking batch. */
static int do_io(struct ctx *t, bool put, xport_block_io *b, uint32_t n, uint32_t tmo)
{
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	int rc = put ? xport_put_blocks(t->p, b, n, tmo, xport_waiter_cb, &w)
		     : xport_get_blocks(t->p, b, n, tmo, xport_waiter_cb, &w);
	if (rc == 0)
		rc = xport_waiter_wait(&w);
	xport_waiter_destroy(&w);
	return rc;
}

/* A test command to the server (APPEND_KV on a test arena, over TCP). */
static int ctl(struct ctx *t, uint8_t arena, uint32_t slot, uint32_t off, uint32_t len, uint64_t seed)
{
	uint64_t k = seed, v = 0;
	xport_append_io a = {.ref = {.h = {.slot = slot, .gen = 0, .arena = arena},
	                             .layer = off,
	                             .token = len,
	                             .n_tokens = 1,
	                             .bytes = 8},
	                     .k = &k,
	                     .v = &v};
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	int rc = xport_append(t->p, &a, 1, OP_TIMEOUT_MS, xport_waiter_cb, &w);
	if (rc == 0)
		rc = xport_waiter_wait(&w);
	xport_waiter_destroy(&w);
	return rc ? rc : a.status;
}

static const uint32_t sizes[] = {4096, 65536, 1u << 20, 8u << 20};
#define N_SIZES (sizeof(sizes) / sizeof(sizes[0]))

/* GET of each size, one batch, at offsets that are not slot-aligned. */
static void t_get_sizes(struct ctx *t)
{
	xport_block_io b[N_SIZES];
	uint64_t loff = 0;
	for (uint32_t i = 0; i < N_SIZES; i++) {
		uint32_t off = sizes[i] == SLOT_BYTES ? 0 : 4096 * (i + 1) + 8 * i;
		b[i] = (xport_block_io){.ref = ref_of(t, i % 3, off, sizes[i]), .buf = t->buf + loff};
		memset(b[i].buf, 0xAA, sizes[i]);
		loff += sizes[i];
	}
	int64_t t0 = now_ms();
	int rc = do_io(t, false, b, N_SIZES, OP_TIMEOUT_MS);
	int64_t dt = now_ms() - t0;
	for (uint32_t i = 0; i < N_SIZES; i++) {
		char name[64];
		snprintf(name, sizeof(name), "get_read_%ukb", sizes[i] / 1024);
		long bad = rc || b[i].status ? -2 : check(b[i].buf, sizes[i], b[i].ref.h.slot + 1, b[i].ref.offset);
		result(bad == -1, name, "rc=%d status=%d mismatch_at=%ld (batch of %zu in %lld ms)", rc, b[i].status,
		       bad, N_SIZES, (long long)dt);
	}
}

/* PUT of each size into slot 3, checked by the server and read back. */
static void t_put_sizes(struct ctx *t)
{
	for (uint32_t i = 0; i < N_SIZES; i++) {
		uint64_t seed = 1000 + i;
		uint32_t off = sizes[i] == SLOT_BYTES ? 0 : 8192 * (i + 1);
		xport_block_io b = {.ref = ref_of(t, 3, off, sizes[i]), .buf = t->buf};
		fill(t->buf, sizes[i], seed, off);
		int64_t t0 = now_ms();
		int rc = do_io(t, true, &b, 1, OP_TIMEOUT_MS);
		int64_t dt = now_ms() - t0;
		int crc = rc ? rc : ctl(t, T_CHECK, 3, off, sizes[i], seed);
		memset(t->buf + SLOT_BYTES, 0x55, sizes[i]);
		xport_block_io g = {.ref = ref_of(t, 3, off, sizes[i]), .buf = t->buf + SLOT_BYTES};
		int grc = crc ? crc : do_io(t, false, &g, 1, OP_TIMEOUT_MS);
		long bad = grc ? -2 : check(g.buf, sizes[i], seed, off);
		char name[64];
		snprintf(name, sizeof(name), "put_write_%ukb", sizes[i] / 1024);
		result(rc == 0 && crc == 0 && bad == -1, name,
		       "put=%d (%lld ms) server_check=%d read_back=%d mismatch_at=%ld", rc, (long long)dt, crc, grc,
		       bad);
	}
}

/* 256 single-entry GETs (and 32 PUTs) all in flight at once: more than the send
 * queue holds, so some wait for room. */
static void t_many_in_flight(struct ctx *t)
{
	enum { NG = 256, NP = 32, SZ = 16384 };
	static xport_block_io g[NG], p[NP];
	xport_waiter w;
	xport_waiter_init(&w);
	int rejected = 0;
	for (uint32_t i = 0; i < NP; i++) {
		uint32_t off = 4u << 20 | i * SZ;
		p[i] = (xport_block_io){.ref = ref_of(t, 3, off, SZ), .buf = t->buf + (16u << 20) + i * SZ};
		fill(p[i].buf, SZ, 5000, off);
	}
	int64_t t0 = now_ms();
	for (uint32_t i = 0; i < NG; i++) {
		uint32_t slot = i % 3, off = (i * 7919u % 500) * SZ;
		g[i] = (xport_block_io){.ref = ref_of(t, slot, off, SZ), .buf = t->buf + (uint64_t)i * SZ};
		xport_waiter_add(&w, 1);
		if (xport_get_blocks(t->p, &g[i], 1, OP_TIMEOUT_MS, xport_waiter_cb, &w)) {
			xport_waiter_cb(&w, -EIO);
			rejected++;
		}
		if (i % 8 == 0 && i / 8 < NP) {
			xport_waiter_add(&w, 1);
			if (xport_put_blocks(t->p, &p[i / 8], 1, OP_TIMEOUT_MS, xport_waiter_cb, &w)) {
				xport_waiter_cb(&w, -EIO);
				rejected++;
			}
		}
	}
	int rc = xport_waiter_wait(&w);
	int64_t dt = now_ms() - t0;
	xport_waiter_destroy(&w);
	int bad = 0;
	for (uint32_t i = 0; i < NG; i++)
		bad += g[i].status != 0 || check(g[i].buf, SZ, g[i].ref.h.slot + 1, g[i].ref.offset) >= 0;
	int crc = ctl(t, T_CHECK, 3, 4u << 20, NP * SZ, 5000);
	result(rc == 0 && rejected == 0 && bad == 0 && crc == 0, "many_in_flight",
	       "%d GETs + %d PUTs of %d KB in %lld ms: rc=%d rejected=%d bad_gets=%d puts_checked=%d", NG, NP, SZ / 1024,
	       (long long)dt, rc, rejected, bad, crc);
}

static void t_bad_handles(struct ctx *t)
{
	/* Slot 2 is reused: its generation moves on, the old handle must be refused. */
	uint32_t old = t->gen[2];
	int brc = ctl(t, T_BUMP, 2, 0, 0, 0);
	memset(t->buf, 0xAA, 65536);
	xport_block_io b = {.ref = ref_of(t, 2, 0, 65536), .buf = t->buf};
	int rc = do_io(t, false, &b, 1, OP_TIMEOUT_MS);
	bool untouched = t->buf[0] == 0xAA && t->buf[65535] == 0xAA;
	result(brc == 0 && rc == -ESTALE && b.status == -ESTALE && untouched, "stale_get_refused",
	       "rc=%d (%s) status=%d buffer_untouched=%d", rc, kvm_strerror(rc), b.status, untouched);

	fill(t->buf, 65536, 9, 0);
	b = (xport_block_io){.ref = ref_of(t, 2, 0, 65536), .buf = t->buf};
	rc = do_io(t, true, &b, 1, OP_TIMEOUT_MS);
	int crc = ctl(t, T_CHECK, 2, 0, 65536, 3); /* still slot 2's pattern (seed 3) */
	result(rc == -ESTALE && crc == 0, "stale_put_refused", "rc=%d (%s) slot_unchanged=%d", rc, kvm_strerror(rc),
	       crc == 0);
	t->gen[2] = old + 1;

	/* A batch mixing good and bad entries: each gets its own status. */
	xport_block_io m[3] = {
	        {.ref = ref_of(t, 2, 0, 4096), .buf = t->buf},
	        {.ref = ref_of(t, 99, 0, 4096), .buf = t->buf + 4096},
	        {.ref = ref_of(t, 1, SLOT_BYTES - 4096, 8192), .buf = t->buf + 8192},
	};
	rc = do_io(t, false, m, 3, OP_TIMEOUT_MS);
	bool good = m[0].status == 0 && check(t->buf, 4096, 3, 0) < 0;
	result(good && m[1].status == -ENOENT && m[2].status == -ERANGE && rc != 0, "bad_slot_and_range_refused",
	       "rc=%d good_entry=%d slot99=%d (%s) past_end=%d (%s)", rc, good, m[1].status,
	       kvm_strerror(m[1].status), m[2].status, kvm_strerror(m[2].status));

	/* A buffer outside the registered region is refused before anything is sent. */
	static uint8_t unreg[4096];
	b = (xport_block_io){.ref = ref_of(t, 0, 0, 4096), .buf = unreg};
	xport_waiter w;
	xport_waiter_init(&w);
	rc = xport_get_blocks(t->p, &b, 1, OP_TIMEOUT_MS, xport_waiter_cb, &w);
	xport_waiter_destroy(&w);
	result(rc == -EINVAL, "unregistered_buffer_refused", "rc=%d (%s)", rc, kvm_strerror(rc));

	/* And the connection still works. */
	b = (xport_block_io){.ref = ref_of(t, 0, 4096, 4096), .buf = t->buf};
	rc = do_io(t, false, &b, 1, OP_TIMEOUT_MS);
	result(rc == 0 && check(t->buf, 4096, 1, 4096) < 0, "usable_after_refusals", "rc=%d", rc);
}

/* ---- ATTEND, APPEND_KV, PING: SEND/RECV messages ---------------------------- */

#define QH 4
#define MAXD 40
#define MAXQ 8

/* One ATTEND batch of nq queries with head_dim hd, its inputs and outputs. */
struct abatch {
	wire_shape shape;
	uint32_t nq;
	xport_attend_query q[MAXQ];
	wire_handle hs[MAXQ][3];
	float qv[MAXQ][QH * MAXD], o[MAXQ][QH * MAXD], lse[MAXQ][QH];
	int rc;
	xport_waiter *w;
};

static void ab_cb(void *arg, int status)
{
	struct abatch *a = arg;
	a->rc = status;
	xport_waiter_cb(a->w, 0);
}

static void ab_init(struct abatch *a, uint32_t nq, uint32_t hd, uint32_t seed, bool one_empty)
{
	a->shape = (wire_shape){.q_heads = QH, .kv_heads = 1, .head_dim = hd, .block_tokens = 16, .scale = 0.125f};
	a->nq = nq;
	a->rc = 1;
	for (uint32_t i = 0; i < nq; i++) {
		bool empty = one_empty && i == 1; /* no blocks, no tokens: fails alone */
		uint32_t nb = empty ? 0 : 1 + (i + seed) % 3;
		for (uint32_t b = 0; b < nb; b++)
			a->hs[i][b] = (wire_handle){.slot = seed + i + b, .gen = 1 + b, .arena = ARENA_ID};
		for (uint32_t k = 0; k < QH * hd; k++)
			a->qv[i][k] = (float)((seed * 7 + i * 13 + k) % 97) / 8;
		memset(a->o[i], 0xFF, sizeof(a->o[i]));
		a->q[i] = (xport_attend_query){.n_tokens = empty ? 0 : (nb - 1) * 16 + 1 + (i + seed) % 16,
		                               .n_blocks = nb,
		                               .blocks = a->hs[i],
		                               .q = a->qv[i],
		                               .o = a->o[i],
		                               .lse = a->lse[i],
		                               .status = 1};
	}
}

/* 0 if every query's result is the reference one (or the expected -EINVAL). */
static int ab_check(const struct abatch *a)
{
	if (a->rc)
		return -1;
	uint32_t hd = a->shape.head_dim;
	for (uint32_t i = 0; i < a->nq; i++) {
		float o[QH * MAXD], lse[QH];
		uint64_t hsum = 0;
		for (uint32_t b = 0; b < a->q[i].n_blocks; b++)
			hsum += a->hs[i][b].slot + a->hs[i][b].gen;
		int st = attend_ref_one(QH, hd, a->q[i].n_tokens, hsum, a->qv[i], o, lse);
		if (st != a->q[i].status)
			return (int)i + 1;
		if (st == 0 && (memcmp(o, a->o[i], QH * hd * 4) || memcmp(lse, a->lse[i], sizeof(lse))))
			return (int)i + 1;
	}
	return 0;
}

static void t_attend(struct ctx *t)
{
	static struct abatch a[64];
	xport_waiter w;
	/* One batch of 6 queries, one of them empty (its own -EINVAL). */
	xport_waiter_init(&w);
	ab_init(&a[0], 6, 32, 1, true);
	a[0].w = &w;
	xport_waiter_add(&w, 1);
	int rc = xport_attend(t->p, &a[0].shape, a[0].q, a[0].nq, OP_TIMEOUT_MS, ab_cb, &a[0]);
	if (rc)
		ab_cb(&a[0], rc);
	xport_waiter_wait(&w);
	int bad = ab_check(&a[0]);
	result(rc == 0 && bad == 0, "attend_queries_reference", "rc=%d batch=%d (%s) bad query=%d", rc, a[0].rc,
	       kvm_strerror(a[0].rc), bad);

	/* 64 batches in flight at once (more than the 16 message credits), half of
	 * them deferred to the server's threads, completed there in another order. */
	int64_t t0 = now_ms();
	int refused = 0;
	for (uint32_t k = 0; k < 64; k++) {
		ab_init(&a[k], 1 + k % MAXQ, k % 2 ? DEFER_DIM : 16, k, false);
		a[k].w = &w;
		xport_waiter_add(&w, 1);
		if (xport_attend(t->p, &a[k].shape, a[k].q, a[k].nq, OP_TIMEOUT_MS, ab_cb, &a[k])) {
			refused++;
			ab_cb(&a[k], -EIO);
		}
	}
	xport_waiter_wait(&w);
	int wrong = 0;
	for (uint32_t k = 0; k < 64; k++)
		wrong += ab_check(&a[k]) != 0;
	result(refused == 0 && wrong == 0, "attend_many_in_flight_deferred",
	       "64 batches (32 deferred): %d refused, %d wrong, %lld ms", refused, wrong, (long long)(now_ms() - t0));
	xport_waiter_destroy(&w);
}

/* APPEND_KV entries checked byte for byte by the server; one corrupted entry fails
 * alone; a batch too large for a message slot goes over TCP and works the same. */
static void t_append(struct ctx *t)
{
	enum { N = 5, B = 3000, BIG = 100000 };
	static uint8_t kv[2][N][BIG];
	xport_append_io a[N];
	for (uint32_t i = 0; i < N; i++) {
		fill(kv[0][i], B, 10 + i, 0);
		fill(kv[1][i], B, 11 + i, 0);
		a[i] = (xport_append_io){.ref = {.h = {.slot = i, .arena = T_KV}, .layer = 10 + i, .n_tokens = 1, .bytes = B},
		                         .k = kv[0][i],
		                         .v = kv[1][i],
		                         .status = 1};
	}
	kv[1][3][100] ^= 1; /* entry 3's v is wrong */
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	int rc = xport_append(t->p, a, N, OP_TIMEOUT_MS, xport_waiter_cb, &w);
	if (rc == 0)
		rc = xport_waiter_wait(&w);
	bool ok = rc == 0 && a[0].status == 0 && a[1].status == 0 && a[2].status == 0 && a[3].status == -EBADMSG &&
	          a[4].status == 0;
	result(ok, "append_kv_checked_by_server", "rc=%d statuses %d %d %d %d %d", rc, a[0].status, a[1].status,
	       a[2].status, a[3].status, a[4].status);
	for (uint32_t i = 0; i < 2; i++) {
		fill(kv[0][i], BIG, 20 + i, 0);
		fill(kv[1][i], BIG, 21 + i, 0);
		a[i] = (xport_append_io){.ref = {.h = {.slot = i, .arena = T_KV}, .layer = 20 + i, .n_tokens = 1, .bytes = BIG},
		                         .k = kv[0][i],
		                         .v = kv[1][i],
		                         .status = 1};
	}
	xport_waiter_add(&w, 1);
	rc = xport_append(t->p, a, 2, OP_TIMEOUT_MS, xport_waiter_cb, &w);
	if (rc == 0)
		rc = xport_waiter_wait(&w);
	result(rc == 0 && a[0].status == 0 && a[1].status == 0, "append_kv_larger_than_slot_over_tcp",
	       "rc=%d statuses %d %d", rc, a[0].status, a[1].status);
	xport_waiter_destroy(&w);
}

static void t_ping(struct ctx *t)
{
	xport_waiter w;
	xport_waiter_init(&w);
	int64_t t0 = now_ms();
	int rc = 0;
	for (int i = 0; i < 20 && rc == 0; i++) {
		xport_waiter_add(&w, 1);
		rc = xport_ping(t->p, OP_TIMEOUT_MS, xport_waiter_cb, &w);
		if (rc == 0)
			rc = xport_waiter_wait(&w);
	}
	result(rc == 0, "ping", "rc=%d, 20 pings in %lld ms", rc, (long long)(now_ms() - t0));
	xport_waiter_destroy(&w);
}

struct timed {
	xport_waiter *w;
	int64_t done_ms;
};

static void timed_cb(void *arg, int status)
{
	struct timed *x = arg;
	x->done_ms = now_ms();
	xport_waiter_cb(x->w, status);
}

static bool clear_death_error(int st)
{
	return st == -ECONNRESET || st == -ENOTCONN || st == -ETIMEDOUT;
}

/* The server is killed while READs are in flight: every request ends, with a clear
 * error, within its deadline; later requests fail fast. */
static void t_peer_killed(struct ctx *t, pid_t child)
{
	enum { N = 16, SZ = 1u << 20 };
	xport_block_io b[N];
	struct timed tm[N];
	xport_waiter w;
	xport_waiter_init(&w);
	int64_t t0 = now_ms();
	int rejected = 0;
	for (uint32_t i = 0; i < N; i++) {
		b[i] = (xport_block_io){.ref = ref_of(t, i % 2, (i % 8) * SZ, SZ), .buf = t->buf + (uint64_t)i * SZ};
		tm[i] = (struct timed){.w = &w};
		xport_waiter_add(&w, 1);
		if (xport_get_blocks(t->p, &b[i], 1, DEATH_MS, timed_cb, &tm[i])) {
			timed_cb(&tm[i], -EIO);
			rejected++;
		}
	}
	/* And ATTENDs that the server never answers (deferred forever). */
	enum { NA = 4 };
	static struct abatch ab[NA];
	xport_waiter aw;
	xport_waiter_init(&aw);
	int a_rej = 0;
	for (uint32_t k = 0; k < NA; k++) {
		ab_init(&ab[k], 2, HANG_DIM, k, false);
		ab[k].w = &aw;
		xport_waiter_add(&aw, 1);
		if (xport_attend(t->p, &ab[k].shape, ab[k].q, ab[k].nq, DEATH_MS, ab_cb, &ab[k])) {
			a_rej++;
			ab_cb(&ab[k], -EIO);
		}
	}
	int drc = ctl(t, T_DIE, 0, 0, 0, 0);
	xport_waiter_wait(&w);
	xport_waiter_wait(&aw);
	xport_waiter_destroy(&aw);
	int64_t a_worst = now_ms() - t0;
	int a_clear = 0;
	for (uint32_t k = 0; k < NA; k++)
		a_clear += clear_death_error(ab[k].rc);
	result(a_rej == 0 && a_clear == NA && a_worst <= DEATH_MS + 2000, "peer_killed_attend_inflight",
	       "%d of %d unanswered ATTENDs failed with a clear error (first: %d, %s), all within %lld ms (deadline %d)",
	       a_clear, NA, ab[0].rc, kvm_strerror(ab[0].rc), (long long)a_worst, DEATH_MS);
	xport_waiter_destroy(&w);
	int ok = 0, failed_clear = 0, other = 0;
	int64_t worst = 0;
	for (uint32_t i = 0; i < N; i++) {
		if (tm[i].done_ms - t0 > worst)
			worst = tm[i].done_ms - t0;
		if (b[i].status == 0 && check(b[i].buf, SZ, b[i].ref.h.slot + 1, b[i].ref.offset) < 0)
			ok++;
		else if (clear_death_error(b[i].status))
			failed_clear++;
		else
			other++;
	}
	result(rejected == 0 && other == 0 && worst <= DEATH_MS + 2000 && clear_death_error(drc), "peer_killed_inflight",
	       "%d completed before the kill, %d failed with a clear error, %d otherwise; slowest %lld ms "
	       "(deadline %d); the kill request got %d (%s)",
	       ok, failed_clear, other, (long long)worst, DEATH_MS, drc, kvm_strerror(drc));
	if (child > 0)
		waitpid(child, NULL, 0);

	/* After the death: a new request fails fast and clearly, or is refused. */
	xport_block_io g = {.ref = ref_of(t, 0, 0, 4096), .buf = t->buf};
	int64_t t1 = now_ms();
	int rc = do_io(t, false, &g, 1, DEATH_MS);
	int64_t dt = now_ms() - t1;
	result(clear_death_error(rc) && dt <= DEATH_MS + 2000, "request_after_death_fails",
	       "rc=%d (%s) after %lld ms", rc, kvm_strerror(rc), (long long)dt);
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	t1 = now_ms();
	rc = xport_ping(t->p, DEATH_MS, xport_waiter_cb, &w);
	if (rc == 0)
		rc = xport_waiter_wait(&w);
	xport_waiter_destroy(&w);
	dt = now_ms() - t1;
	result(clear_death_error(rc) && dt <= 1000, "ping_after_death_fails", "rc=%d (%s) after %lld ms", rc,
	       kvm_strerror(rc), (long long)dt);
}

static int connect_retry(struct ctx *t, const char *host, uint16_t port, const xport_rdma_cfg *cfg)
{
	xport_opts o;
	xport_opts_default(&o);
	o.node_id = 1;
	o.n_conns = 1;
	int64_t until = now_ms() + 20000;
	int rc;
	/* The two-node server starts at the same time as we do. */
	while ((rc = xport_rdma_connect(t->l, host, port, &o, cfg, &t->p)) == -ECONNREFUSED && now_ms() < until)
		usleep(100 * 1000);
	return rc;
}

static int run_client(const char *host, uint16_t port, const char *devname, pid_t child)
{
	struct ctx t = {0};
	struct xrdma_dev *dev = NULL;
	struct xrdma_mr *mr = NULL;
	char msg[XRDMA_ERRLEN] = "";
	int64_t t0 = now_ms();
	int rc = xrdma_dev_open(devname, &dev, msg, sizeof(msg));
	if (rc) {
		result(false, "open_device", "%s", msg);
		goto out;
	}
	t.buf = mmap(NULL, CLIENT_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (t.buf == MAP_FAILED) {
		result(false, "client_buffer", "mmap failed");
		goto clean_dev;
	}
	if ((rc = xrdma_mr_reg(dev, t.buf, CLIENT_LEN, &mr))) {
		result(false, "register", "%s", xrdma_dev_error(dev));
		goto clean_map;
	}
	if ((rc = xport_loop_create(&t.l))) {
		result(false, "loop", "%s", kvm_strerror(rc));
		goto clean_mr;
	}
	for (int i = 0; i < N_SLOTS; i++)
		t.gen[i] = 1;
	xport_rdma_cfg cfg = {.dev = dev, .mr = mr};
	rc = connect_retry(&t, host, port, &cfg);
	result(rc == 0, "connect", "%s:%u rc=%d (%s) in %lld ms", host, port, rc, kvm_strerror(rc),
	       (long long)(now_ms() - t0));
	if (rc)
		goto clean_loop;
	result(xport_connect(&xport_rdma_ops, t.l, host, port, NULL, &(xport_peer *){NULL}) == -EINVAL,
	       "generic_connect_needs_cfg", NULL);
	t_get_sizes(&t);
	t_put_sizes(&t);
	t_many_in_flight(&t);
	t_bad_handles(&t);
	t_attend(&t);
	t_append(&t);
	t_ping(&t);
	t_peer_killed(&t, child);
	child = 0;
	xport_close(t.p);
clean_loop:
	xport_loop_destroy(t.l);
clean_mr:
	xrdma_mr_dereg(mr);
clean_map:
	munmap(t.buf, CLIENT_LEN);
clean_dev:
	xrdma_dev_close(dev);
out:
	if (child > 0) {
		kill(child, SIGKILL);
		waitpid(child, NULL, 0);
	}
	printf("[%s] done in %lld ms\n", g_tag, (long long)(now_ms() - t0));
	printf("%d passed, %d failed\n", g_passed, g_failed);
	return g_failed ? 1 : 0;
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
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (serve_port)
		return serve(serve_port, dev, -1);

	/* Probe, then close again before forking: verbs resources must not cross a fork. */
	struct xrdma_dev *probe;
	char msg[XRDMA_ERRLEN] = "";
	int rc = xrdma_dev_open(dev, &probe, msg, sizeof(msg));
	if (rc == -ENODEV) {
		printf("SKIP: %s\n", msg);
		printf("0 passed, 0 failed (skipped: no RDMA device present)\n");
		return EXIT_SKIP;
	}
	if (rc) {
		printf("[%s] FAIL open_device: %s (%s)\n0 passed, 1 failed\n", g_tag, msg, kvm_strerror(rc));
		return 1;
	}
	xrdma_dev_close(probe);

	if (connect_to) {
		g_tag = strcmp(g_tag, "one-node") ? g_tag : "two-node";
		char host[64];
		const char *colon = strrchr(connect_to, ':');
		if (!colon || (size_t)(colon - connect_to) >= sizeof(host)) {
			printf("[%s] FAIL bad --connect %s\n0 passed, 1 failed\n", g_tag, connect_to);
			return 1;
		}
		memcpy(host, connect_to, (size_t)(colon - connect_to));
		host[colon - connect_to] = 0;
		return run_client(host, (uint16_t)atoi(colon + 1), dev, 0);
	}

	int ready[2];
	if (pipe(ready)) {
		perror("pipe");
		return 1;
	}
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		close(ready[0]);
		_exit(serve(ONE_NODE_PORT, dev, ready[1]));
	}
	close(ready[1]);
	char c;
	if (read(ready[0], &c, 1) != 1) {
		printf("[%s] FAIL server_start\n0 passed, 1 failed\n", g_tag);
		waitpid(pid, NULL, 0);
		return 1;
	}
	close(ready[0]);
	return run_client("127.0.0.1", ONE_NODE_PORT, dev, pid);
}
