/* TCP transport over loopback: every operation with many requests in flight,
 * blocks of 4 KB to 8 MB, random interleavings, deadlines, peers that die
 * mid-frame, bad checksums, oversized lengths and counts, unknown opcodes and
 * versions. Traffic goes to 127.0.0.1 only. */
#include <criterion/criterion.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "transport/transport.h"

/* ---- an in-memory block store behind the server handlers ---------------- */

#define NSLOTS 64

struct slot {
	uint8_t *buf;
	uint32_t size;
	uint32_t gen;
	uint64_t csum; /* XXH3 of the whole block, kept from a whole-block PUT */
};

struct store {
	pthread_mutex_t mu;
	struct slot s[NSLOTS];
	atomic_int pins;
	atomic_int commits_ok, commits_failed;
};

static int st_lookup(struct store *st, const wire_handle *h, uint32_t off, uint32_t len, struct slot **out)
{
	if (h->slot >= NSLOTS || !st->s[h->slot].buf)
		return -ENOENT;
	struct slot *s = &st->s[h->slot];
	if (s->gen != h->gen)
		return -ESTALE;
	if ((uint64_t)off + len > s->size)
		return -ERANGE;
	*out = s;
	return 0;
}

static int h_get(void *ctx, const wire_block_ref *r, const void **data, void **pin, uint64_t *csum)
{
	struct store *st = ctx;
	struct slot *s;
	pthread_mutex_lock(&st->mu);
	int rc = st_lookup(st, &r->h, r->offset, r->len, &s);
	pthread_mutex_unlock(&st->mu);
	if (rc)
		return rc;
	*data = s->buf + r->offset;
	*pin = s;
	if (r->offset == 0 && r->len == s->size)
		*csum = s->csum; /* served without rehashing */
	atomic_fetch_add(&st->pins, 1);
	return 0;
}

static void h_unpin(void *ctx, void *pin)
{
	struct store *st = ctx;
	(void)pin;
	atomic_fetch_sub(&st->pins, 1);
}

struct txn {
	struct slot *s;
	uint8_t *staging;
};

static int h_put_prepare(void *ctx, const wire_block_ref *r, void **dst, void **txn)
{
	struct store *st = ctx;
	struct slot *s;
	pthread_mutex_lock(&st->mu);
	int rc = st_lookup(st, &r->h, r->offset, r->len, &s);
	pthread_mutex_unlock(&st->mu);
	if (rc)
		return rc;
	struct txn *t = malloc(sizeof *t);
	t->s = s;
	t->staging = malloc(r->len);
	*dst = t->staging;
	*txn = t;
	return 0;
}

static int h_put_commit(void *ctx, const wire_block_ref *r, void *txn, int status, uint64_t csum)
{
	struct store *st = ctx;
	struct txn *t = txn;
	if (status == 0) {
		pthread_mutex_lock(&st->mu);
		memcpy(t->s->buf + r->offset, t->staging, r->len);
		t->s->csum = r->offset == 0 && r->len == t->s->size ? csum : 0;
		pthread_mutex_unlock(&st->mu);
		atomic_fetch_add(&st->commits_ok, 1);
	} else {
		atomic_fetch_add(&st->commits_failed, 1);
	}
	free(t->staging);
	free(t);
	return status;
}

/* A deterministic stand-in for the kernel: o = q * (n_blocks + 1) + sum of
 * slot ids, lse[h] = n_tokens + h. Enough to check that bytes travel. */
static int h_attend(void *ctx, const wire_attend_view *v, const float *q, float *o, float *lse, int *st,
		    xport_attend_token *tok)
{
	(void)tok;
	struct store *s = ctx;
	const uint8_t *cur = v->queries;
	wire_attend_query aq;
	uint32_t H = v->shape.q_heads, D = v->shape.head_dim;
	for (uint32_t i = 0; wire_attend_next(v, &cur, &aq) == 0; i++) {
		float sum = 0;
		st[i] = 0;
		for (uint32_t j = 0; j < aq.n_blocks; j++) {
			wire_handle h;
			wire_attend_handle(&aq, j, &h);
			struct slot *sl;
			pthread_mutex_lock(&s->mu);
			int rc = st_lookup(s, &h, 0, 0, &sl);
			pthread_mutex_unlock(&s->mu);
			if (rc)
				st[i] = rc;
			sum += (float)h.slot;
		}
		for (uint32_t k = 0; k < H * D; k++)
			o[(size_t)i * H * D + k] = q[(size_t)i * H * D + k] * (float)(aq.n_blocks + 1) + sum;
		for (uint32_t h = 0; h < H; h++)
			lse[(size_t)i * H + h] = (float)aq.n_tokens + (float)h;
	}
	return 0;
}

static int h_append(void *ctx, const wire_append_ref *r, const void *k, const void *v)
{
	struct store *st = ctx;
	struct slot *s;
	uint64_t off = (uint64_t)r->token * 2 * r->bytes;
	pthread_mutex_lock(&st->mu);
	int rc = off + 2ull * r->bytes > UINT32_MAX ? -ERANGE : st_lookup(st, &r->h, (uint32_t)off, 2 * r->bytes, &s);
	if (rc == 0) {
		memcpy(s->buf + off, k, r->bytes);
		memcpy(s->buf + off + r->bytes, v, r->bytes);
	}
	pthread_mutex_unlock(&st->mu);
	return rc;
}

static const xport_handlers handlers = {
	.get = h_get,
	.unpin = h_unpin,
	.put_prepare = h_put_prepare,
	.put_commit = h_put_commit,
	.attend = h_attend,
	.append = h_append,
};

/* ---- fixture ------------------------------------------------------------ */

static struct store store;
static xport_loop *sloop, *cloop;
static xport_server *srv;
static xport_opts opts;

static uint32_t slot_size(int i)
{
	/* 4 KB .. 8 MB: slots 0-3 are the extremes and middles. */
	static const uint32_t sizes[] = {4096, 65536, 2u << 20, 8u << 20};
	return i < 4 ? sizes[i] : 4096u << (i % 6);
}

static void setup(void)
{
	memset(&store, 0, sizeof store);
	pthread_mutex_init(&store.mu, NULL);
	for (int i = 0; i < NSLOTS; i++) {
		store.s[i].size = slot_size(i);
		store.s[i].buf = calloc(1, store.s[i].size);
		store.s[i].gen = 1;
	}
	xport_opts_default(&opts);
	opts.node_id = 1;
	cr_assert_eq(xport_loop_create(&sloop), 0);
	cr_assert_eq(xport_loop_create(&cloop), 0);
	cr_assert_eq(xport_tcp_listen(sloop, "127.0.0.1", 0, &opts, &handlers, &store, &srv), 0);
	cr_assert_neq(srv->port, 0);
}

static void teardown(void)
{
	xport_server_close(srv);
	xport_loop_destroy(sloop);
	xport_loop_destroy(cloop);
	cr_assert_eq(atomic_load(&store.pins), 0, "every pin released");
	for (int i = 0; i < NSLOTS; i++)
		free(store.s[i].buf);
	pthread_mutex_destroy(&store.mu);
}

TestSuite(transport, .init = setup, .fini = teardown, .timeout = 60);

static xport_peer *connect_peer(uint32_t n_conns)
{
	xport_opts o = opts;
	o.node_id = 2;
	o.n_conns = n_conns;
	xport_peer *p = NULL;
	cr_assert_eq(xport_connect(&xport_tcp_ops, cloop, "127.0.0.1", srv->port, &o, &p), 0);
	cr_assert_eq(p->remote_node_id, 1);
	return p;
}

static void fill(uint8_t *b, size_t n, uint32_t seed)
{
	uint32_t x = seed * 2654435761u + 1;
	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		b[i] = (uint8_t)x;
	}
}

/* ---- operations ------------------------------------------------------------ */

Test(transport, ping_many_in_flight)
{
	xport_peer *p = connect_peer(2);
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 2000);
	for (int i = 0; i < 2000; i++)
		cr_assert_eq(xport_ping(p, 5000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	xport_waiter_destroy(&w);
	xport_close(p);
}

Test(transport, put_then_get_4k_to_8m)
{
	xport_peer *p = connect_peer(3);
	enum { N = 12 };
	xport_block_io io[N];
	uint8_t *src[N], *dst[N];
	for (int i = 0; i < N; i++) {
		uint32_t sz = slot_size(i);
		src[i] = malloc(sz);
		dst[i] = calloc(1, sz);
		fill(src[i], sz, (uint32_t)i + 100);
	}
	/* PUT every block, one request per block, all in flight at once. */
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, N);
	for (int i = 0; i < N; i++) {
		io[i] = (xport_block_io){.ref = {{(uint32_t)i, 1, 0}, 0, slot_size(i)}, .buf = src[i]};
		cr_assert_eq(xport_put_blocks(p, &io[i], 1, 10000, xport_waiter_cb, &w), 0);
	}
	cr_assert_eq(xport_waiter_wait(&w), 0);
	for (int i = 0; i < N; i++)
		cr_assert_eq(io[i].status, 0);
	pthread_mutex_lock(&store.mu);
	for (int i = 0; i < N; i++)
		cr_assert(memcmp(store.s[i].buf, src[i], slot_size(i)) == 0, "slot %d stored", i);
	pthread_mutex_unlock(&store.mu);
	/* GET them back in one batched request. */
	for (int i = 0; i < N; i++)
		io[i] = (xport_block_io){.ref = {{(uint32_t)i, 1, 0}, 0, slot_size(i)}, .buf = dst[i]};
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_get_blocks(p, io, N, 10000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	for (int i = 0; i < N; i++) {
		cr_assert_eq(io[i].status, 0);
		cr_assert(memcmp(dst[i], src[i], slot_size(i)) == 0, "block %d read back", i);
		/* The checksum computed at PUT, kept by the store, served at GET. */
		struct iovec v = {src[i], slot_size(i)};
		cr_assert_eq(io[i].csum, wire_csum_iov(&v, 1), "block %d checksum", i);
	}
	/* One batched PUT of 3 entries, one with the caller's own checksum. */
	for (int i = 0; i < 3; i++) {
		fill(src[i], slot_size(i), (uint32_t)i + 300);
		io[i] = (xport_block_io){.ref = {{(uint32_t)i, 1, 0}, 0, slot_size(i)}, .buf = src[i]};
	}
	struct iovec v1 = {src[1], slot_size(1)};
	io[1].csum = wire_csum_iov(&v1, 1);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_put_blocks(p, io, 3, 10000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	pthread_mutex_lock(&store.mu);
	for (int i = 0; i < 3; i++)
		cr_assert(memcmp(store.s[i].buf, src[i], slot_size(i)) == 0, "batched slot %d stored", i);
	pthread_mutex_unlock(&store.mu);
	/* A range of one block. */
	memset(dst[3], 0, 100);
	io[0] = (xport_block_io){.ref = {{3, 1, 0}, 12345, 100}, .buf = dst[3]};
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_get_blocks(p, io, 1, 10000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	cr_assert(memcmp(dst[3], src[3] + 12345, 100) == 0);
	xport_waiter_destroy(&w);
	xport_close(p);
	for (int i = 0; i < N; i++) {
		free(src[i]);
		free(dst[i]);
	}
}

Test(transport, per_entry_errors)
{
	xport_peer *p = connect_peer(1);
	uint8_t buf[4][4096];
	xport_block_io io[4] = {
		{.ref = {{0, 1, 0}, 0, 4096}, .buf = buf[0]},         /* fine */
		{.ref = {{1, 7, 0}, 0, 4096}, .buf = buf[1]},         /* stale generation */
		{.ref = {{NSLOTS + 5, 1, 0}, 0, 4096}, .buf = buf[2]}, /* no such slot */
		{.ref = {{0, 1, 0}, 1, 4096}, .buf = buf[3]},         /* past the end */
	};
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_get_blocks(p, io, 4, 5000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	cr_assert_eq(io[0].status, 0);
	cr_assert_eq(io[1].status, -ESTALE);
	cr_assert_eq(io[2].status, -ENOENT);
	cr_assert_eq(io[3].status, -ERANGE);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_put_blocks(p, io + 1, 2, 5000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	cr_assert_eq(io[1].status, -ESTALE);
	cr_assert_eq(io[2].status, -ENOENT);
	xport_waiter_destroy(&w);
	xport_close(p);
}

Test(transport, attend_batch)
{
	xport_peer *p = connect_peer(2);
	wire_shape s = {.q_heads = 8, .kv_heads = 2, .head_dim = 64, .block_tokens = 16, .kv_dtype = 1, .scale = 0.125f};
	enum { NQ = 32, HD = 8 * 64 };
	static float q[NQ][HD], o[NQ][HD], lse[NQ][8];
	wire_handle hs[NQ][4];
	xport_attend_query aq[NQ];
	for (int i = 0; i < NQ; i++) {
		uint32_t nb = (uint32_t)(i % 4) + 1;
		for (uint32_t j = 0; j < nb; j++)
			hs[i][j] = (wire_handle){(uint32_t)(i + (int)j) % NSLOTS, 1, 0};
		if (i == 5)
			hs[i][0].gen = 9; /* one stale query */
		for (int k = 0; k < HD; k++)
			q[i][k] = (float)(i * 1000 + k);
		aq[i] = (xport_attend_query){.n_tokens = nb * 16 - 3, .n_blocks = nb, .blocks = hs[i], .q = q[i], .o = o[i],
					     .lse = lse[i]};
	}
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_attend(p, &s, aq, NQ, 5000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	for (int i = 0; i < NQ; i++) {
		cr_assert_eq(aq[i].status, i == 5 ? -ESTALE : 0);
		float sum = 0;
		for (uint32_t j = 0; j < aq[i].n_blocks; j++)
			sum += (float)hs[i][j].slot;
		for (int k = 0; k < HD; k++)
			cr_assert_float_eq(o[i][k], q[i][k] * (float)(aq[i].n_blocks + 1) + sum, 1e-3);
		for (int h = 0; h < 8; h++)
			cr_assert_float_eq(lse[i][h], (float)aq[i].n_tokens + (float)h, 0);
	}
	xport_waiter_destroy(&w);
	xport_close(p);
}

Test(transport, append_kv)
{
	xport_peer *p = connect_peer(1);
	uint8_t k[3][512], v[3][512];
	xport_append_io a[3];
	for (int i = 0; i < 3; i++) {
		fill(k[i], 512, (uint32_t)i);
		fill(v[i], 512, (uint32_t)i + 50);
		a[i] = (xport_append_io){.ref = {{4, 1, 0}, 0, (uint32_t)i, 1, 512}, .k = k[i], .v = v[i]};
	}
	a[2].ref.h.gen = 3;
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_append(p, a, 3, 5000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	cr_assert_eq(a[0].status, 0);
	cr_assert_eq(a[1].status, 0);
	cr_assert_eq(a[2].status, -ESTALE);
	pthread_mutex_lock(&store.mu);
	cr_assert(memcmp(store.s[4].buf + 1024, k[1], 512) == 0);
	cr_assert(memcmp(store.s[4].buf + 1536, v[1], 512) == 0);
	pthread_mutex_unlock(&store.mu);
	xport_waiter_destroy(&w);
	xport_close(p);
}

/* Random interleavings: two threads submit a random mix of GET, PUT, PING
 * and ATTEND on one peer; each PUT writes a slot only that thread owns. */
struct mix_arg {
	xport_peer *p;
	int tid;
	int failures;
};

static void *mix_thread(void *arg)
{
	struct mix_arg *m = arg;
	uint32_t rnd = (uint32_t)m->tid * 7919u + 17;
	enum { OPS = 150 };
	uint8_t *bufs[OPS];
	xport_block_io io[OPS];
	xport_waiter w;
	xport_waiter_init(&w);
	uint32_t owned = 10 + (uint32_t)m->tid; /* 4 KB << (10+tid)%6 */
	uint32_t osz = slot_size((int)owned);
	uint8_t *pattern = malloc(osz);
	fill(pattern, osz, owned);
	int n_put = 0;
	for (int i = 0; i < OPS; i++) {
		rnd = rnd * 1103515245u + 12345u;
		int kind = (int)(rnd >> 16) % 3;
		bufs[i] = NULL;
		if (kind == 0) {
			xport_waiter_add(&w, 1);
			if (xport_ping(m->p, 10000, xport_waiter_cb, &w))
				m->failures++;
		} else if (kind == 1 || n_put == 0) {
			io[i] = (xport_block_io){.ref = {{owned, 1, 0}, 0, osz}, .buf = pattern};
			xport_waiter_add(&w, 1);
			if (xport_put_blocks(m->p, &io[i], 1, 10000, xport_waiter_cb, &w))
				m->failures++;
			n_put++;
		} else {
			/* GET a random read-only slot (20..): content is all zeros. */
			uint32_t sl = 20 + (rnd >> 8) % 20;
			bufs[i] = malloc(slot_size((int)sl));
			memset(bufs[i], 0xee, slot_size((int)sl));
			io[i] = (xport_block_io){.ref = {{sl, 1, 0}, 0, slot_size((int)sl)}, .buf = bufs[i]};
			xport_waiter_add(&w, 1);
			if (xport_get_blocks(m->p, &io[i], 1, 10000, xport_waiter_cb, &w))
				m->failures++;
		}
	}
	if (xport_waiter_wait(&w))
		m->failures++;
	for (int i = 0; i < OPS; i++) {
		if (!bufs[i])
			continue;
		if (io[i].status)
			m->failures++;
		for (uint32_t k = 0; k < io[i].ref.len; k += 511)
			if (bufs[i][k] != 0) {
				m->failures++;
				break;
			}
		free(bufs[i]);
	}
	xport_waiter_destroy(&w);
	free(pattern);
	return NULL;
}

Test(transport, random_interleavings_two_threads)
{
	xport_peer *p = connect_peer(3);
	pthread_t th[2];
	struct mix_arg ma[2] = {{p, 0, 0}, {p, 1, 0}};
	for (int i = 0; i < 2; i++)
		pthread_create(&th[i], NULL, mix_thread, &ma[i]);
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	cr_assert_eq(ma[0].failures, 0);
	cr_assert_eq(ma[1].failures, 0);
	xport_close(p);
}

Test(transport, limits_refused_locally)
{
	xport_peer *p = connect_peer(1);
	uint8_t b[16];
	xport_block_io io = {.ref = {{0, 1, 0}, 0, 0}, .buf = b};
	cr_assert_eq(xport_get_blocks(p, &io, 1, 1000, xport_waiter_cb, NULL), -EINVAL);
	cr_assert_eq(xport_get_blocks(p, &io, opts.limits.max_blocks + 1, 1000, xport_waiter_cb, NULL), -EMSGSIZE);
	/* What the server's decoder would refuse is refused here, before it can
	 * cost the connection. */
	io.ref.len = opts.limits.max_block_bytes + 1;
	cr_assert_eq(xport_get_blocks(p, &io, 1, 1000, xport_waiter_cb, NULL), -EMSGSIZE);
	wire_shape s = {.q_heads = 6, .kv_heads = 4, .head_dim = 8, .block_tokens = 16, .scale = 0.3f};
	float q[48], o[48], lse[6];
	wire_handle hs[1] = {{0, 1, 0}};
	xport_attend_query aq = {.n_tokens = 20, .n_blocks = 1, .blocks = hs, .q = q, .o = o, .lse = lse};
	cr_assert_eq(xport_attend(p, &s, &aq, 1, 1000, xport_waiter_cb, NULL), -EINVAL, "heads that do not divide");
	s.kv_heads = 2;
	cr_assert_eq(xport_attend(p, &s, &aq, 1, 1000, xport_waiter_cb, NULL), -EINVAL, "20 tokens in one 16-token block");
	/* The connection is still good. */
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_ping(p, 2000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	xport_waiter_destroy(&w);
	xport_close(p);
}

/* ---- misbehaving servers (raw sockets) -------------------------------------- */

static int raw_listen(uint16_t *port)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
	cr_assert_eq(listen(fd, 8), 0);
	socklen_t l = sizeof a;
	getsockname(fd, (struct sockaddr *)&a, &l);
	*port = ntohs(a.sin_port);
	return fd;
}

static int read_full(int fd, void *b, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(fd, (uint8_t *)b + got, n - got);
		if (r <= 0)
			return -1;
		got += (size_t)r;
	}
	return 0;
}

/* Sends a frame; bad_meta/bad_bulk corrupt a checksum. */
static void send_frame(int fd, uint8_t op, uint16_t flags, uint64_t id, const void *meta, uint32_t ml, const void *bulk,
		       uint32_t bl, int bad_meta, int bad_bulk)
{
	uint8_t hdr[WIRE_HDR_LEN];
	wire_header h = {.magic = WIRE_MAGIC, .version = WIRE_VERSION, .opcode = op, .flags = flags, .req_id = id,
			 .meta_len = ml, .bulk_len = bl};
	/* One segment: right for whole-bulk frames and single-entry PUT/GET. */
	struct iovec iov = {(void *)bulk, bl};
	uint64_t one = bl ? wire_csum_iov(&iov, 1) : 0;
	h.bulk_csum = bl ? wire_csum_combine(&one, 1) ^ (uint64_t)bad_bulk : 0;
	wire_encode_header(&h, hdr);
	h.meta_csum = wire_csum_meta(hdr, meta, ml) ^ (uint64_t)bad_meta;
	wire_encode_header(&h, hdr);
	cr_assert_eq(write(fd, hdr, sizeof hdr), (ssize_t)sizeof hdr);
	if (ml)
		cr_assert_eq(write(fd, meta, ml), (ssize_t)ml);
	if (bl)
		cr_assert_eq(write(fd, bulk, bl), (ssize_t)bl);
}

/* Reads one frame's header and meta (meta into m[cap]); skips bulk. */
static int recv_frame(int fd, wire_header *h, uint8_t *m, size_t cap)
{
	uint8_t hdr[WIRE_HDR_LEN];
	wire_limits lim;
	wire_limits_default(&lim);
	if (read_full(fd, hdr, sizeof hdr))
		return -1;
	if (wire_decode_header(hdr, &lim, h) || h->meta_len > cap)
		return -2;
	if (read_full(fd, m, h->meta_len))
		return -1;
	return 0;
}

/* Plays the server side of HELLO on an accepted raw socket. */
static void raw_hello_server(int fd)
{
	wire_header h;
	uint8_t m[256];
	cr_assert_eq(recv_frame(fd, &h, m, sizeof m), 0);
	cr_assert_eq(h.opcode, WIRE_OP_HELLO);
	wire_hello me = {.node_id = 9, .caps = WIRE_CAP_TCP, .ver_min = 1, .ver_max = 1};
	uint8_t out[64];
	wire_buf b = {.p = out, .cap = sizeof out};
	wire_encode_hello(&b, 1, 0, &me);
	send_frame(fd, WIRE_OP_HELLO, WIRE_F_REPLY, h.req_id, out, (uint32_t)b.len, NULL, 0, 0, 0);
}

enum raw_mode { RAW_SILENT, RAW_DIE_MID_FRAME, RAW_BAD_BULK_CSUM };
struct raw_srv {
	int lfd;
	enum raw_mode mode;
};

static void *raw_server(void *arg)
{
	struct raw_srv *rs = arg;
	int fd = accept(rs->lfd, NULL, NULL);
	raw_hello_server(fd);
	wire_header h;
	uint8_t m[4096];
	if (recv_frame(fd, &h, m, sizeof m) == 0 && rs->mode != RAW_SILENT) {
		/* Reply to a GET of one 64 KB block. */
		static uint8_t data[65536];
		uint8_t meta[12];
		wire_buf b = {.p = meta, .cap = sizeof meta};
		uint32_t ok = 0;
		wire_encode_status_reply(&b, 0, &ok, 1);
		if (rs->mode == RAW_DIE_MID_FRAME) {
			uint8_t hdr[WIRE_HDR_LEN];
			wire_header r = {.magic = WIRE_MAGIC, .version = 1, .opcode = WIRE_OP_GET_BLOCKS,
					 .flags = WIRE_F_REPLY, .req_id = h.req_id, .meta_len = 12, .bulk_len = 65536};
			wire_encode_header(&r, hdr);
			r.meta_csum = wire_csum_meta(hdr, meta, 12);
			wire_encode_header(&r, hdr);
			cr_assert_eq(write(fd, hdr, sizeof hdr), (ssize_t)sizeof hdr);
			cr_assert_eq(write(fd, meta, 12), 12);
			cr_assert_eq(write(fd, data, 1000), 1000); /* then vanish */
		} else {
			send_frame(fd, WIRE_OP_GET_BLOCKS, WIRE_F_REPLY, h.req_id, meta, 12, data, 65536, 0, 1);
		}
	}
	if (rs->mode == RAW_SILENT || rs->mode == RAW_BAD_BULK_CSUM) {
		/* Keep the socket open until the client goes away. */
		char c;
		while (read(fd, &c, 1) > 0)
			;
	}
	close(fd);
	return NULL;
}

static int run_against_raw(enum raw_mode mode, uint32_t timeout_ms, int64_t *elapsed_ms)
{
	struct raw_srv rs = {.mode = mode};
	uint16_t port;
	rs.lfd = raw_listen(&port);
	pthread_t th;
	pthread_create(&th, NULL, raw_server, &rs);
	xport_opts o = opts;
	o.n_conns = 1;
	xport_peer *p;
	cr_assert_eq(xport_tcp_connect(cloop, "127.0.0.1", port, &o, &p), 0);
	cr_assert_eq(p->remote_node_id, 9);
	static uint8_t dst[65536];
	xport_block_io io = {.ref = {{0, 1, 0}, 0, 65536}, .buf = dst};
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	cr_assert_eq(xport_get_blocks(p, &io, 1, timeout_ms, xport_waiter_cb, &w), 0);
	int rc = xport_waiter_wait(&w);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	*elapsed_ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
	/* A later request on the dead or poisoned peer fails cleanly too. */
	xport_waiter_add(&w, 1);
	if (xport_ping(p, 200, xport_waiter_cb, &w) == 0)
		xport_waiter_wait(&w);
	xport_close(p);
	pthread_join(th, NULL);
	close(rs.lfd);
	xport_waiter_destroy(&w);
	return rc;
}

Test(transport, deadline_on_silent_peer)
{
	int64_t ms;
	cr_assert_eq(run_against_raw(RAW_SILENT, 300, &ms), -ETIMEDOUT);
	cr_assert(ms >= 290 && ms < 2000, "timed out after %lld ms", (long long)ms);
}

Test(transport, peer_dies_mid_frame)
{
	int64_t ms;
	cr_assert_eq(run_against_raw(RAW_DIE_MID_FRAME, 5000, &ms), -ECONNRESET);
	cr_assert(ms < 3000);
}

Test(transport, reply_with_bad_bulk_checksum)
{
	int64_t ms;
	cr_assert_eq(run_against_raw(RAW_BAD_BULK_CSUM, 5000, &ms), -EBADMSG);
}

Test(transport, server_closes_with_many_in_flight)
{
	xport_peer *p = connect_peer(2);
	enum { N = 64 };
	static uint8_t dst[N][65536];
	xport_block_io io[N];
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, N);
	for (int i = 0; i < N; i++) {
		io[i] = (xport_block_io){.ref = {{1, 1, 0}, 0, 65536}, .buf = dst[i]};
		cr_assert_eq(xport_get_blocks(p, &io[i], 1, 5000, xport_waiter_cb, &w), 0);
	}
	xport_server_close(srv); /* every connection goes away, mid-stream or not */
	srv = NULL;
	/* Requests complete, or fail with ECONNRESET (their connection died) or
	 * ENOTCONN (submitted after every connection had died). */
	int rc = xport_waiter_wait(&w);
	cr_assert(rc == 0 || rc == -ECONNRESET || rc == -ENOTCONN, "rc=%d", rc);
	/* Nothing left: new requests fail at once. */
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_ping(p, 1000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), -ENOTCONN);
	xport_waiter_destroy(&w);
	xport_close(p);
	cr_assert_eq(xport_tcp_listen(sloop, "127.0.0.1", 0, &opts, &handlers, &store, &srv), 0);
}

/* ---- misbehaving clients against the real server ------------------------------ */

static int raw_connect(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(srv->port),
				.sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
	struct timeval tv = {.tv_sec = 5};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	return fd;
}

static void raw_hello_client(int fd)
{
	wire_hello me = {.node_id = 3, .caps = WIRE_CAP_TCP, .ver_min = 1, .ver_max = 1};
	uint8_t out[64];
	wire_buf b = {.p = out, .cap = sizeof out};
	wire_encode_hello(&b, 0, 0, &me);
	send_frame(fd, WIRE_OP_HELLO, 0, 1, out, (uint32_t)b.len, NULL, 0, 0, 0);
	wire_header h;
	uint8_t m[256];
	cr_assert_eq(recv_frame(fd, &h, m, sizeof m), 0);
	cr_assert_eq(h.opcode, WIRE_OP_HELLO);
}

/* Expects an ERROR frame with `code`, then the server closing. */
static void expect_error_and_close(int fd, uint32_t code)
{
	wire_header h;
	uint8_t m[2048];
	cr_assert_eq(recv_frame(fd, &h, m, sizeof m), 0, "an ERROR frame arrives");
	cr_assert_eq(h.opcode, WIRE_OP_ERROR);
	wire_limits lim;
	wire_limits_default(&lim);
	uint32_t c, ml;
	const char *msg;
	cr_assert_eq(wire_decode_error(m, h.meta_len, &lim, &c, &msg, &ml), 0);
	cr_assert_eq(c, code, "error code %u, want %u (%.*s)", c, code, (int)ml, msg);
	char b;
	ssize_t r = read(fd, &b, 1);
	cr_assert(r == 0 || (r < 0 && errno == ECONNRESET), "closed after the error");
	close(fd);
}

static uint64_t proto_errors(void)
{
	xport_stats st;
	xport_server_stats(srv, &st);
	return st.proto_errors;
}

Test(transport, bad_meta_checksum_rejected)
{
	int fd = raw_connect();
	raw_hello_client(fd);
	uint8_t m[8] = {1};
	send_frame(fd, WIRE_OP_PING, 0, 5, m, 8, NULL, 0, 1, 0);
	expect_error_and_close(fd, WIRE_E_CHECKSUM);
	cr_assert_eq(proto_errors(), 1);
}

Test(transport, put_with_bad_bulk_checksum_changes_nothing)
{
	pthread_mutex_lock(&store.mu);
	memset(store.s[0].buf, 0x5a, 4096);
	pthread_mutex_unlock(&store.mu);
	int fd = raw_connect();
	raw_hello_client(fd);
	wire_block_ref r = {{0, 1, 0}, 0, 4096};
	uint8_t meta[64], bulk[4096];
	wire_buf b = {.p = meta, .cap = sizeof meta};
	wire_encode_blocks_req(&b, &r, 1);
	memset(bulk, 0x11, sizeof bulk);
	send_frame(fd, WIRE_OP_PUT_BLOCKS, 0, 6, meta, (uint32_t)b.len, bulk, 4096, 0, 1);
	expect_error_and_close(fd, WIRE_E_CHECKSUM);
	pthread_mutex_lock(&store.mu);
	for (int i = 0; i < 4096; i++)
		cr_assert_eq(store.s[0].buf[i], 0x5a, "stored byte %d unchanged", i);
	pthread_mutex_unlock(&store.mu);
	cr_assert_eq(atomic_load(&store.commits_ok), 0);
	cr_assert_eq(atomic_load(&store.commits_failed), 1);
}

Test(transport, oversized_lengths_rejected_before_allocation)
{
	/* meta_len of 4 GB: rejected from the header alone. */
	int fd = raw_connect();
	raw_hello_client(fd);
	uint8_t hdr[WIRE_HDR_LEN];
	wire_header h = {.magic = WIRE_MAGIC, .version = 1, .opcode = WIRE_OP_GET_BLOCKS, .req_id = 9,
			 .meta_len = 0xFFFFFFF0u};
	wire_encode_header(&h, hdr);
	cr_assert_eq(write(fd, hdr, sizeof hdr), (ssize_t)sizeof hdr);
	expect_error_and_close(fd, WIRE_E_TOOBIG);
	/* bulk_len above the limit. */
	fd = raw_connect();
	raw_hello_client(fd);
	h.meta_len = 8;
	h.bulk_len = opts.limits.max_bulk + 1;
	h.opcode = WIRE_OP_PUT_BLOCKS;
	wire_encode_header(&h, hdr);
	cr_assert_eq(write(fd, hdr, sizeof hdr), (ssize_t)sizeof hdr);
	expect_error_and_close(fd, WIRE_E_TOOBIG);
	/* A block count above the limit in well-formed metadata. */
	fd = raw_connect();
	raw_hello_client(fd);
	uint8_t meta[8] = {0};
	uint32_t n = opts.limits.max_blocks + 1;
	memcpy(meta, &n, 4);
	send_frame(fd, WIRE_OP_GET_BLOCKS, 0, 10, meta, 8, NULL, 0, 0, 0);
	expect_error_and_close(fd, WIRE_E_TOOBIG);
	/* A block length above the limit. */
	fd = raw_connect();
	raw_hello_client(fd);
	wire_block_ref r = {{0, 1, 0}, 0, opts.limits.max_block_bytes + 1};
	uint8_t m2[64];
	wire_buf b = {.p = m2, .cap = sizeof m2};
	wire_encode_blocks_req(&b, &r, 1);
	send_frame(fd, WIRE_OP_GET_BLOCKS, 0, 11, m2, (uint32_t)b.len, NULL, 0, 0, 0);
	expect_error_and_close(fd, WIRE_E_TOOBIG);
	cr_assert_eq(proto_errors(), 4);
}

Test(transport, unknown_opcode_and_version)
{
	int fd = raw_connect();
	raw_hello_client(fd);
	uint8_t m[8] = {0};
	send_frame(fd, 0x42, 0, 12, m, 8, NULL, 0, 0, 0);
	expect_error_and_close(fd, WIRE_E_OPCODE);
	fd = raw_connect();
	uint8_t hdr[WIRE_HDR_LEN];
	wire_header h = {.magic = WIRE_MAGIC, .version = 7, .opcode = WIRE_OP_HELLO, .req_id = 13};
	wire_encode_header(&h, hdr);
	cr_assert_eq(write(fd, hdr, sizeof hdr), (ssize_t)sizeof hdr);
	expect_error_and_close(fd, WIRE_E_VERSION);
	/* A HELLO offering only version 2..3. */
	fd = raw_connect();
	wire_hello me = {.node_id = 3, .ver_min = 2, .ver_max = 3};
	uint8_t out[64];
	wire_buf b = {.p = out, .cap = sizeof out};
	wire_encode_hello(&b, 0, 0, &me);
	send_frame(fd, WIRE_OP_HELLO, 0, 1, out, (uint32_t)b.len, NULL, 0, 0, 0);
	expect_error_and_close(fd, WIRE_E_VERSION);
	/* Anything before HELLO. */
	fd = raw_connect();
	send_frame(fd, WIRE_OP_PING, 0, 1, m, 8, NULL, 0, 0, 0);
	expect_error_and_close(fd, WIRE_E_INVAL);
}

Test(transport, client_dies_mid_put_discards)
{
	int fd = raw_connect();
	raw_hello_client(fd);
	wire_block_ref r = {{2, 1, 0}, 0, 2u << 20};
	uint8_t meta[64];
	wire_buf b = {.p = meta, .cap = sizeof meta};
	wire_encode_blocks_req(&b, &r, 1);
	uint8_t hdr[WIRE_HDR_LEN];
	wire_header h = {.magic = WIRE_MAGIC, .version = 1, .opcode = WIRE_OP_PUT_BLOCKS, .req_id = 3,
			 .meta_len = (uint32_t)b.len, .bulk_len = 2u << 20, .bulk_csum = 1};
	wire_encode_header(&h, hdr);
	h.meta_csum = wire_csum_meta(hdr, meta, b.len);
	wire_encode_header(&h, hdr);
	static uint8_t part[100000];
	memset(part, 0x77, sizeof part);
	cr_assert_eq(write(fd, hdr, sizeof hdr), (ssize_t)sizeof hdr);
	cr_assert_eq(write(fd, meta, b.len), (ssize_t)b.len);
	cr_assert_eq(write(fd, part, sizeof part), (ssize_t)sizeof part);
	close(fd);
	/* The server notices, discards the prepared PUT, and serves others. */
	for (int i = 0; i < 200 && atomic_load(&store.commits_failed) == 0; i++)
		usleep(10000);
	cr_assert_eq(atomic_load(&store.commits_failed), 1);
	cr_assert_eq(atomic_load(&store.commits_ok), 0);
	xport_peer *p = connect_peer(1);
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_ping(p, 2000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	xport_waiter_destroy(&w);
	xport_close(p);
}

/* A client that never reads: the server stops reading it (back-pressure)
 * instead of queueing replies without bound, and still serves others. */
Test(transport, slow_reader_back_pressure)
{
	int fd = raw_connect();
	int small = 4096;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
	raw_hello_client(fd);
	wire_block_ref r = {{3, 1, 0}, 0, 8u << 20};
	uint8_t meta[64];
	wire_buf b = {.p = meta, .cap = sizeof meta};
	wire_encode_blocks_req(&b, &r, 1);
	/* 20 GETs of 8 MB = 160 MB of replies against a 64 MB backlog. */
	for (int i = 0; i < 20; i++)
		send_frame(fd, WIRE_OP_GET_BLOCKS, 0, 100 + (uint64_t)i, meta, (uint32_t)b.len, NULL, 0, 0, 0);
	usleep(200000);
	xport_peer *p = connect_peer(1);
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_ping(p, 2000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0, "other clients are served");
	xport_waiter_destroy(&w);
	xport_close(p);
	int pins = atomic_load(&store.pins);
	cr_assert(pins > 0 && pins < 20, "replies held back, not all queued: pins=%d", pins);
	close(fd);
	for (int i = 0; i < 200 && atomic_load(&store.pins); i++)
		usleep(10000);
}

/* A PUT times out while half written (the peer does not read): the caller
 * gets -ETIMEDOUT and frees its buffer at once; the transport finishes the
 * frame from a private copy, so the stream stays whole and the peer, once it
 * reads, finds a valid frame followed by the next request. */
struct stall_srv {
	int lfd;
	int frame_ok, next_ok;
};

static void *stall_server(void *arg)
{
	struct stall_srv *s = arg;
	int fd = accept(s->lfd, NULL, NULL);
	int small = 16384;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
	struct timeval tv = {.tv_sec = 10};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	raw_hello_server(fd);
	usleep(700000); /* let the client's deadline pass mid-frame */
	uint8_t hdr[WIRE_HDR_LEN];
	wire_limits lim;
	wire_limits_default(&lim);
	wire_header h;
	if (read_full(fd, hdr, sizeof hdr) == 0 && wire_decode_header(hdr, &lim, &h) == 0) {
		size_t n = WIRE_HDR_LEN + (size_t)h.meta_len + h.bulk_len;
		uint8_t *f = malloc(n);
		memcpy(f, hdr, sizeof hdr);
		if (read_full(fd, f + WIRE_HDR_LEN, n - WIRE_HDR_LEN) == 0)
			s->frame_ok = wire_decode_frame(f, n, &lim) == 0 && h.opcode == WIRE_OP_PUT_BLOCKS;
		free(f);
	}
	uint8_t m[64];
	if (recv_frame(fd, &h, m, sizeof m) == 0)
		s->next_ok = h.opcode == WIRE_OP_PING;
	close(fd);
	return NULL;
}

Test(transport, deadline_mid_transmit_keeps_stream_whole)
{
	struct stall_srv ss = {0};
	uint16_t port;
	ss.lfd = raw_listen(&port);
	pthread_t th;
	pthread_create(&th, NULL, stall_server, &ss);
	xport_opts o = opts;
	o.n_conns = 1;
	o.sockbuf_bytes = 65536;
	xport_peer *p;
	cr_assert_eq(xport_tcp_connect(cloop, "127.0.0.1", port, &o, &p), 0);
	uint32_t len = 8u << 20;
	uint8_t *src = malloc(len);
	fill(src, len, 5);
	xport_block_io io = {.ref = {{1, 1, 0}, 0, len}, .buf = src};
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_put_blocks(p, &io, 1, 200, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), -ETIMEDOUT);
	memset(src, 0, len); /* the caller's buffer is the caller's again */
	free(src);
	/* Queued behind the rest of the PUT; the raw peer reads it, then closes. */
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_ping(p, 20000, xport_waiter_cb, &w), 0);
	pthread_join(th, NULL);
	cr_assert_eq(xport_waiter_wait(&w), -ECONNRESET);
	cr_assert(ss.frame_ok, "the timed-out PUT arrived whole, checksum valid");
	cr_assert(ss.next_ok, "the next request follows it in the stream");
	xport_waiter_destroy(&w);
	xport_close(p);
	close(ss.lfd);
}

static int h_hello_deny(void *ctx, const wire_hello *h)
{
	(void)ctx;
	return h->node_id == 666 ? -EACCES : 0;
}

/* The HELLO handler refuses a node: connect fails with -EACCES. */
Test(transport, hello_refused)
{
	xport_handlers h = handlers;
	h.hello = h_hello_deny;
	xport_server *s2;
	cr_assert_eq(xport_tcp_listen(sloop, "127.0.0.1", 0, &opts, &h, &store, &s2), 0);
	xport_opts o = opts;
	o.node_id = 666;
	xport_peer *p = NULL;
	cr_assert_eq(xport_tcp_connect(cloop, "127.0.0.1", s2->port, &o, &p), -EACCES);
	o.node_id = 7;
	cr_assert_eq(xport_tcp_connect(cloop, "127.0.0.1", s2->port, &o, &p), 0);
	xport_close(p);
	xport_server_close(s2);
}

/* Bulk checksums off (WIRE_F_BULK_NOCSUM): bytes still travel intact, no
 * checksum is reported; and a tiny in-flight window sends the rest through
 * the peer's wait queue, in order, deadlines included. */
Test(transport, nocsum_and_wait_queue)
{
	xport_server *s2;
	xport_opts so = opts;
	so.bulk_checksum = 0;
	cr_assert_eq(xport_tcp_listen(sloop, "127.0.0.1", 0, &so, &handlers, &store, &s2), 0);
	xport_opts o = opts;
	o.bulk_checksum = 0;
	o.n_conns = 1;
	o.max_inflight = 2;
	xport_peer *p;
	cr_assert_eq(xport_tcp_connect(cloop, "127.0.0.1", s2->port, &o, &p), 0);
	enum { N = 40 };
	static uint8_t src[65536], dst[N][65536];
	fill(src, sizeof src, 77);
	xport_block_io put = {.ref = {{1, 1, 0}, 0, 65536}, .buf = src};
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_put_blocks(p, &put, 1, 5000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	xport_block_io io[N];
	xport_waiter_add(&w, N);
	for (int i = 0; i < N; i++) {
		io[i] = (xport_block_io){.ref = {{1, 1, 0}, 0, 65536}, .buf = dst[i], .csum = 1};
		cr_assert_eq(xport_get_blocks(p, &io[i], 1, 10000, xport_waiter_cb, &w), 0);
	}
	cr_assert_eq(xport_waiter_wait(&w), 0);
	for (int i = 0; i < N; i++) {
		cr_assert_eq(io[i].status, 0);
		cr_assert_eq(io[i].csum, 0, "no checksum without bulk checksums");
		cr_assert(memcmp(dst[i], src, sizeof src) == 0);
	}
	xport_waiter_destroy(&w);
	xport_close(p);
	xport_server_close(s2);
}

/* Deferred ATTEND: the handler hands the batch to a worker thread and returns
 * XPORT_DEFERRED; the server keeps serving (a PING answers meanwhile); the
 * worker completes it later and the reply arrives with the right numbers. */
struct deferred_job {
	const wire_attend_view *v;
	const float *q;
	float *o, *lse;
	int *st;
	xport_attend_token *tok;
	int delay_ms;
};

static void *deferred_worker(void *arg)
{
	struct deferred_job *j = arg;
	usleep((useconds_t)j->delay_ms * 1000);
	int rc = h_attend(&store, j->v, j->q, j->o, j->lse, j->st, NULL);
	xport_attend_complete(j->tok, rc);
	free(j);
	return NULL;
}

static atomic_int deferred_started;

static int h_attend_deferred(void *ctx, const wire_attend_view *v, const float *q, float *o, float *lse, int *st,
			     xport_attend_token *tok)
{
	(void)ctx;
	struct deferred_job *j = malloc(sizeof *j);
	*j = (struct deferred_job){v, q, o, lse, st, tok, 300};
	pthread_t th;
	pthread_create(&th, NULL, deferred_worker, j);
	pthread_detach(th);
	atomic_fetch_add(&deferred_started, 1);
	return XPORT_DEFERRED;
}

Test(transport, attend_deferred_to_a_worker)
{
	xport_handlers h = handlers;
	h.attend = h_attend_deferred;
	xport_server *s2;
	cr_assert_eq(xport_tcp_listen(sloop, "127.0.0.1", 0, &opts, &h, &store, &s2), 0);
	xport_opts o = opts;
	o.n_conns = 1; /* the PING shares the connection with the ATTEND */
	xport_peer *p;
	cr_assert_eq(xport_tcp_connect(cloop, "127.0.0.1", s2->port, &o, &p), 0);
	wire_shape s = {.q_heads = 4, .kv_heads = 2, .head_dim = 16, .block_tokens = 16, .scale = 0.25f};
	static float q[2][64], out_o[2][64], out_lse[2][4];
	wire_handle hs[2] = {{3, 1, 0}, {5, 1, 0}};
	xport_attend_query aq[2];
	for (int i = 0; i < 2; i++) {
		for (int k = 0; k < 64; k++)
			q[i][k] = (float)(i + k);
		aq[i] = (xport_attend_query){.n_tokens = 20, .n_blocks = 2, .blocks = hs, .q = q[i], .o = out_o[i],
					     .lse = out_lse[i]};
	}
	xport_waiter wa, wp;
	xport_waiter_init(&wa);
	xport_waiter_init(&wp);
	xport_waiter_add(&wa, 1);
	cr_assert_eq(xport_attend(p, &s, aq, 2, 5000, xport_waiter_cb, &wa), 0);
	while (atomic_load(&deferred_started) == 0)
		usleep(1000);
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	xport_waiter_add(&wp, 1);
	cr_assert_eq(xport_ping(p, 5000, xport_waiter_cb, &wp), 0);
	cr_assert_eq(xport_waiter_wait(&wp), 0);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
	cr_assert(ms < 250, "PING answered while the ATTEND computes (%.0f ms)", ms);
	cr_assert_eq(xport_waiter_wait(&wa), 0);
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(aq[i].status, 0);
		for (int k = 0; k < 64; k++)
			cr_assert_float_eq(out_o[i][k], q[i][k] * 3.0f + 8.0f, 1e-4);
		cr_assert_float_eq(out_lse[i][3], 23.0f, 0);
	}
	/* A deferred ATTEND whose connection is gone by the time it completes. */
	atomic_store(&deferred_started, 0);
	xport_waiter_add(&wa, 1);
	cr_assert_eq(xport_attend(p, &s, aq, 2, 5000, xport_waiter_cb, &wa), 0);
	while (atomic_load(&deferred_started) == 0)
		usleep(1000);
	xport_close(p); /* the reply is dropped; the worker's late completion is harmless */
	cr_assert_eq(xport_waiter_wait(&wa), -ECANCELED);
	usleep(400000); /* let the worker complete against the dead connection */
	xport_waiter_destroy(&wa);
	xport_waiter_destroy(&wp);
	xport_server_close(s2);
}

/* Sends a HELLO with auth bytes on a raw socket to port. */
static int raw_hello_with_auth(uint16_t port, const char *auth)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
				.sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
	struct timeval tv = {.tv_sec = 5};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	wire_hello me = {.node_id = 3, .caps = WIRE_CAP_TCP, .ver_min = 1, .ver_max = 1,
			 .auth_len = (uint16_t)strlen(auth), .auth = (const uint8_t *)auth};
	uint8_t out[256];
	wire_buf b = {.p = out, .cap = sizeof out};
	wire_encode_hello(&b, 0, 0, &me);
	send_frame(fd, WIRE_OP_HELLO, 0, 1, out, (uint32_t)b.len, NULL, 0, 0, 0);
	return fd;
}

/* A server with a token refuses a HELLO without it, or with another one,
 * with ERROR DENIED and closes; the right token connects. A client's token
 * is no obstacle to a server without one. */
Test(transport, hello_auth_token)
{
	xport_opts so = opts;
	char token[] = "0123456789abcdef-token";
	so.auth_token = token;
	xport_server *s2;
	cr_assert_eq(xport_tcp_listen(sloop, "127.0.0.1", 0, &so, &handlers, &store, &s2), 0);
	memset(token, 'x', sizeof(token) - 1); /* the server keeps its own copy */

	/* On the wire: ERROR DENIED with a message that says why, then close. */
	static const char *bad[] = {"", "0123456789abcdef-tokeN", "0123456789abcdef-toke",
				    "0123456789abcdef-token2"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int fd = raw_hello_with_auth(s2->port, bad[i]);
		wire_header h;
		uint8_t m[2048];
		cr_assert_eq(recv_frame(fd, &h, m, sizeof m), 0, "an ERROR frame arrives for \"%s\"", bad[i]);
		cr_assert_eq(h.opcode, WIRE_OP_ERROR);
		wire_limits lim;
		wire_limits_default(&lim);
		uint32_t c, ml;
		const char *msg;
		cr_assert_eq(wire_decode_error(m, h.meta_len, &lim, &c, &msg, &ml), 0);
		cr_assert_eq(c, WIRE_E_DENIED, "code %u for \"%s\"", c, bad[i]);
		char text[1100];
		snprintf(text, sizeof text, "%.*s", (int)ml, msg);
		cr_assert(strstr(text, "missing or wrong authorization token"), "message: %s", text);
		char byte;
		ssize_t r = read(fd, &byte, 1);
		cr_assert(r == 0 || (r < 0 && errno == ECONNRESET), "closed after the error");
		close(fd);
	}
	xport_stats st;
	xport_server_stats(s2, &st);
	cr_assert_eq(st.proto_errors, 4);

	/* Through the client: -EACCES without or with a wrong token. */
	xport_opts o = opts;
	o.n_conns = 1;
	xport_peer *p = NULL;
	cr_assert_eq(xport_tcp_connect(cloop, "127.0.0.1", s2->port, &o, &p), -EACCES);
	o.auth_token = "0123456789abcdef-tokeX";
	cr_assert_eq(xport_tcp_connect(cloop, "127.0.0.1", s2->port, &o, &p), -EACCES);
	char right[] = "0123456789abcdef-token";
	o.auth_token = right;
	cr_assert_eq(xport_tcp_connect(cloop, "127.0.0.1", s2->port, &o, &p), 0);
	memset(right, 'x', sizeof(right) - 1); /* the peer keeps its own copy */
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_ping(p, 5000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	xport_waiter_destroy(&w);
	xport_close(p);
	xport_server_close(s2);

	/* A token longer than HELLO can carry is refused before dialling. */
	static char huge[2000];
	memset(huge, 'a', sizeof(huge) - 1);
	o.auth_token = huge;
	cr_assert_eq(xport_tcp_connect(cloop, "127.0.0.1", srv->port, &o, &p), -EINVAL);
	/* The suite's server has no token: a client that sends one is served. */
	o.auth_token = "0123456789abcdef-token";
	cr_assert_eq(xport_tcp_connect(cloop, "127.0.0.1", srv->port, &o, &p), 0);
	xport_close(p);
}
