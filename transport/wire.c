/* Wire format encoders and decoders; see wire.h and docs/wire.md. */
#include "transport/wire.h"

#include <errno.h>
#include <math.h>
#include <string.h>

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

_Static_assert(sizeof(XXH3_state_t) <= sizeof(wire_csum_state), "wire_csum_state too small");

/* csum_avx2.c: the same functions built for AVX2, used when the CPU has it. */
uint64_t wire_xxh3_avx2(const void *p, size_t n);
void wire_xxh3_reset_avx2(void *state);
void wire_xxh3_update_avx2(void *state, const void *p, size_t n);
uint64_t wire_xxh3_digest_avx2(const void *state);

static inline int have_avx2(void)
{
	return __builtin_cpu_supports("avx2");
}

static uint64_t xxh3(const void *p, size_t n)
{
	return have_avx2() ? wire_xxh3_avx2(p, n) : XXH3_64bits(p, n);
}
_Static_assert(sizeof(XXH3_state_t) + 64 <= sizeof(wire_csum_state), "wire_csum_state too small");
_Static_assert(_Alignof(XXH3_state_t) <= 64, "XXH3 state alignment");

/* The XXH3 state inside s, 64-byte aligned (the AVX2 code uses aligned loads). */
static void *st_of(const wire_csum_state *s)
{
	return (void *)(((uintptr_t)s->opaque + 63) & ~(uintptr_t)63);
}

#define BLOCK_REF_LEN 20u
#define HANDLE_LEN 12u
#define APPEND_REF_LEN 28u
#define SHAPE_LEN 28u
#define ATTEND_Q_LEN 8u /* n_tokens, n_blocks */
#define HELLO_LEN 24u   /* node_id, caps, ver_min, ver_max, auth_len, reserved */

/* ---- little-endian primitives ---------------------------------------------- */

static inline uint16_t ld16(const uint8_t *p)
{
	return (uint16_t)(p[0] | (p[1] << 8));
}
static inline uint32_t ld32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v;
}
static inline uint64_t ld64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}
static inline void st16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}
static inline void st32(uint8_t *p, uint32_t v)
{
	memcpy(p, &v, 4);
}
static inline void st64(uint8_t *p, uint64_t v)
{
	memcpy(p, &v, 8);
}

static int room(wire_buf *b, size_t n)
{
	if (b->err)
		return 0;
	if (b->cap - b->len < n) {
		b->err = -ENOSPC;
		return 0;
	}
	return 1;
}
void wire_put_u8(wire_buf *b, uint8_t v)
{
	if (room(b, 1))
		b->p[b->len++] = v;
}
void wire_put_u16(wire_buf *b, uint16_t v)
{
	if (room(b, 2)) {
		st16(b->p + b->len, v);
		b->len += 2;
	}
}
void wire_put_u32(wire_buf *b, uint32_t v)
{
	if (room(b, 4)) {
		st32(b->p + b->len, v);
		b->len += 4;
	}
}
void wire_put_u64(wire_buf *b, uint64_t v)
{
	if (room(b, 8)) {
		st64(b->p + b->len, v);
		b->len += 8;
	}
}
void wire_put_bytes(wire_buf *b, const void *p, size_t n)
{
	if (n && room(b, n)) {
		memcpy(b->p + b->len, p, n);
		b->len += n;
	}
}
void wire_put_handle(wire_buf *b, const wire_handle *h)
{
	wire_put_u32(b, h->slot);
	wire_put_u32(b, h->gen);
	wire_put_u8(b, h->arena);
	wire_put_u8(b, 0);
	wire_put_u16(b, 0);
}

static void get_handle(const uint8_t *p, wire_handle *h)
{
	h->slot = ld32(p);
	h->gen = ld32(p + 4);
	h->arena = p[8];
}
/* Reserved bytes of a handle must be zero. */
static int handle_ok(const uint8_t *p)
{
	return p[9] == 0 && p[10] == 0 && p[11] == 0;
}

/* ---- errors ---------------------------------------------------------------- */

uint32_t wire_err_from_errno(int e)
{
	switch (e) {
	case 0: return WIRE_E_OK;
	case -EINVAL: case -EPROTO: return WIRE_E_INVAL;
	case -ENOENT: return WIRE_E_NOENT;
	case -ESTALE: return WIRE_E_STALE;
	case -ENOMEM: case -ENOSPC: return WIRE_E_NOMEM;
	case -EMSGSIZE: case -E2BIG: return WIRE_E_TOOBIG;
	case -EBADMSG: return WIRE_E_CHECKSUM;
	case -EOPNOTSUPP: return WIRE_E_OPCODE;
	case -EPROTONOSUPPORT: return WIRE_E_VERSION;
	case -ENOSYS: return WIRE_E_NOTSUP;
	case -EBUSY: case -EAGAIN: return WIRE_E_BUSY;
	case -ERANGE: return WIRE_E_RANGE;
	case -EACCES: case -EPERM: return WIRE_E_DENIED;
	case -EXDEV: return WIRE_E_MOVED;
	case -ENODATA: return WIRE_E_DEGRADED;
	default: return WIRE_E_INTERNAL;
	}
}

int wire_err_to_errno(uint32_t c)
{
	switch (c) {
	case WIRE_E_OK: return 0;
	case WIRE_E_INVAL: return -EINVAL;
	case WIRE_E_NOENT: return -ENOENT;
	case WIRE_E_STALE: return -ESTALE;
	case WIRE_E_NOMEM: return -ENOMEM;
	case WIRE_E_TOOBIG: return -EMSGSIZE;
	case WIRE_E_CHECKSUM: return -EBADMSG;
	case WIRE_E_OPCODE: return -EOPNOTSUPP;
	case WIRE_E_VERSION: return -EPROTONOSUPPORT;
	case WIRE_E_NOTSUP: return -ENOSYS;
	case WIRE_E_BUSY: return -EBUSY;
	case WIRE_E_RANGE: return -ERANGE;
	case WIRE_E_DENIED: return -EACCES;
	case WIRE_E_MOVED: return -EXDEV;
	case WIRE_E_DEGRADED: return -ENODATA;
	default: return -EREMOTEIO;
	}
}

void wire_limits_default(wire_limits *l)
{
	l->max_meta = 4u << 20;          /* 4 MiB of metadata */
	l->max_bulk = 256u << 20;        /* 256 MiB of bulk per frame */
	l->max_blocks = 65536;           /* entries or handles per request */
	l->max_block_bytes = 64u << 20;  /* 64 MiB per block entry */
	l->max_queries = 4096;
	l->max_heads = 256;              /* DA_MAX_HEADS */
	l->max_head_dim = 512;           /* DA_MAX_HEAD_DIM */
	l->max_msg = 1024;
}

const char *wire_op_name(uint8_t op)
{
	static const char *n[] = {"?", "HELLO", "PING", "ERROR", "GET_BLOCKS", "PUT_BLOCKS", "ATTEND", "APPEND_KV"};
	return op <= WIRE_OP_MAX_ ? n[op] : "?";
}

/* ---- header ---------------------------------------------------------------- */

void wire_encode_header(const wire_header *h, uint8_t o[WIRE_HDR_LEN])
{
	st32(o, h->magic);
	o[4] = h->version;
	o[5] = h->opcode;
	st16(o + 6, h->flags);
	st64(o + 8, h->req_id);
	st32(o + 16, h->meta_len);
	st32(o + 20, h->bulk_len);
	st64(o + 24, h->meta_csum);
	st64(o + 32, h->bulk_csum);
}

int wire_decode_header(const uint8_t in[WIRE_HDR_LEN], const wire_limits *lim, wire_header *h)
{
	h->magic = ld32(in);
	h->version = in[4];
	h->opcode = in[5];
	h->flags = ld16(in + 6);
	h->req_id = ld64(in + 8);
	h->meta_len = ld32(in + 16);
	h->bulk_len = ld32(in + 20);
	h->meta_csum = ld64(in + 24);
	h->bulk_csum = ld64(in + 32);
	if (h->magic != WIRE_MAGIC)
		return -EPROTO;
	if (h->version != WIRE_VERSION)
		return -EPROTONOSUPPORT;
	if (h->opcode == 0 || h->opcode > WIRE_OP_MAX_)
		return -EOPNOTSUPP;
	if (h->flags & ~WIRE_F_KNOWN_)
		return -EPROTO;
	if (h->meta_len > lim->max_meta || h->bulk_len > lim->max_bulk)
		return -EMSGSIZE;
	if ((h->flags & WIRE_F_BULK_NOCSUM) && h->bulk_csum != 0)
		return -EPROTO;
	return 0;
}

uint64_t wire_csum_meta(const uint8_t hdr[WIRE_HDR_LEN], const void *meta, size_t meta_len)
{
	wire_csum_state s;
	wire_csum_init(&s);
	wire_csum_update(&s, hdr, 24);
	wire_csum_update(&s, meta, meta_len);
	return wire_csum_final(&s);
}

void wire_csum_init(wire_csum_state *s)
{
	if (have_avx2())
		wire_xxh3_reset_avx2(st_of(s));
	else
		XXH3_64bits_reset((XXH3_state_t *)st_of(s));
}
void wire_csum_update(wire_csum_state *s, const void *p, size_t n)
{
	if (!n)
		return;
	if (have_avx2())
		wire_xxh3_update_avx2(st_of(s), p, n);
	else
		XXH3_64bits_update((XXH3_state_t *)st_of(s), p, n);
}
uint64_t wire_csum_final(const wire_csum_state *s)
{
	if (have_avx2())
		return wire_xxh3_digest_avx2(st_of(s));
	return XXH3_64bits_digest((const XXH3_state_t *)st_of(s));
}

uint64_t wire_csum_combine(const uint64_t *seg, uint32_t n)
{
	/* Little-endian host (checked in wire.h): the array is already the bytes. */
	return xxh3(seg, (size_t)n * 8);
}

int wire_bulk_segmented(uint8_t opcode, uint16_t flags)
{
	return (opcode == WIRE_OP_GET_BLOCKS && (flags & WIRE_F_REPLY)) ||
	       (opcode == WIRE_OP_PUT_BLOCKS && !(flags & WIRE_F_REPLY));
}

uint64_t wire_csum_iov(const struct iovec *iov, int iovcnt)
{
	if (iovcnt == 1)
		return xxh3(iov[0].iov_base, iov[0].iov_len);
	wire_csum_state s;
	wire_csum_init(&s);
	for (int i = 0; i < iovcnt; i++)
		wire_csum_update(&s, iov[i].iov_base, iov[i].iov_len);
	return wire_csum_final(&s);
}

/* ---- sizes ------------------------------------------------------------------- */

size_t wire_hello_size(uint16_t auth_len)
{
	return HELLO_LEN + auth_len;
}
size_t wire_blocks_req_size(uint32_t n)
{
	return 8 + (size_t)n * BLOCK_REF_LEN;
}
size_t wire_status_reply_size(uint32_t n)
{
	return 8 + (size_t)n * 4;
}
size_t wire_append_req_size(uint32_t n)
{
	return 8 + (size_t)n * APPEND_REF_LEN;
}
size_t wire_attend_req_size(uint32_t n, uint32_t total_handles)
{
	return SHAPE_LEN + 4 + (size_t)n * ATTEND_Q_LEN + (size_t)total_handles * HANDLE_LEN;
}
size_t wire_error_size(uint32_t msg_len)
{
	return 8 + (size_t)msg_len;
}

uint64_t wire_attend_reply_bulk(const wire_shape *s, uint32_t n)
{
	return (uint64_t)n * s->q_heads * ((uint64_t)s->head_dim + 1) * 4;
}

/* ---- encoders ---------------------------------------------------------------- */

int wire_encode_hello(wire_buf *b, int is_reply, int32_t status, const wire_hello *h)
{
	if (is_reply)
		wire_put_u32(b, (uint32_t)status);
	wire_put_u64(b, h->node_id);
	wire_put_u64(b, h->caps);
	wire_put_u16(b, h->ver_min);
	wire_put_u16(b, h->ver_max);
	wire_put_u16(b, h->auth_len);
	wire_put_u16(b, 0);
	wire_put_bytes(b, h->auth, h->auth_len);
	return b->err;
}

int wire_encode_ping(wire_buf *b, int is_reply, uint64_t stamp)
{
	if (is_reply)
		wire_put_u32(b, 0);
	wire_put_u64(b, stamp);
	return b->err;
}

int wire_encode_error(wire_buf *b, uint32_t code, const char *msg, const wire_limits *lim)
{
	size_t n = msg ? strlen(msg) : 0;
	if (n > lim->max_msg)
		n = lim->max_msg;
	wire_put_u32(b, code);
	wire_put_u32(b, (uint32_t)n);
	wire_put_bytes(b, msg, n);
	return b->err;
}

int wire_encode_blocks_req(wire_buf *b, const wire_block_ref *r, uint32_t n)
{
	wire_put_u32(b, n);
	wire_put_u32(b, 0);
	for (uint32_t i = 0; i < n; i++) {
		wire_put_handle(b, &r[i].h);
		wire_put_u32(b, r[i].offset);
		wire_put_u32(b, r[i].len);
	}
	return b->err;
}

int wire_encode_status_reply(wire_buf *b, uint32_t status, const uint32_t *st, uint32_t n)
{
	wire_put_u32(b, status);
	wire_put_u32(b, n);
	for (uint32_t i = 0; i < n; i++)
		wire_put_u32(b, st ? st[i] : 0);
	return b->err;
}

int wire_encode_append_req(wire_buf *b, const wire_append_ref *r, uint32_t n)
{
	wire_put_u32(b, n);
	wire_put_u32(b, 0);
	for (uint32_t i = 0; i < n; i++) {
		wire_put_handle(b, &r[i].h);
		wire_put_u32(b, r[i].layer);
		wire_put_u32(b, r[i].token);
		wire_put_u32(b, r[i].n_tokens);
		wire_put_u32(b, r[i].bytes);
	}
	return b->err;
}

int wire_encode_attend_begin(wire_buf *b, const wire_shape *s, uint32_t n_queries)
{
	uint32_t scale;
	memcpy(&scale, &s->scale, 4);
	wire_put_u32(b, s->q_heads);
	wire_put_u32(b, s->kv_heads);
	wire_put_u32(b, s->head_dim);
	wire_put_u32(b, s->block_tokens);
	wire_put_u32(b, s->layer);
	wire_put_u32(b, s->kv_dtype);
	wire_put_u32(b, scale);
	wire_put_u32(b, n_queries);
	return b->err;
}

int wire_encode_attend_query(wire_buf *b, uint32_t n_tokens, const wire_handle *h, uint32_t n_blocks)
{
	wire_put_u32(b, n_tokens);
	wire_put_u32(b, n_blocks);
	for (uint32_t i = 0; i < n_blocks; i++)
		wire_put_handle(b, &h[i]);
	return b->err;
}

/* ---- decoders ---------------------------------------------------------------- */

int wire_decode_hello(const uint8_t *m, size_t len, int is_reply, const wire_limits *lim,
		      int32_t *status, wire_hello *h)
{
	*status = 0;
	if (is_reply) {
		if (len < 4)
			return -EPROTO;
		*status = (int32_t)ld32(m);
		m += 4;
		len -= 4;
	}
	if (len < HELLO_LEN)
		return -EPROTO;
	h->node_id = ld64(m);
	h->caps = ld64(m + 8);
	h->ver_min = ld16(m + 16);
	h->ver_max = ld16(m + 18);
	h->auth_len = ld16(m + 20);
	if (ld16(m + 22) != 0)
		return -EPROTO;
	if (h->auth_len > lim->max_msg)
		return -EMSGSIZE;
	if (len != HELLO_LEN + (size_t)h->auth_len)
		return -EPROTO;
	h->auth = m + HELLO_LEN;
	return 0;
}

int wire_decode_ping(const uint8_t *m, size_t len, int is_reply, int32_t *status, uint64_t *stamp)
{
	*status = 0;
	if (len != (is_reply ? 12u : 8u))
		return -EPROTO;
	if (is_reply) {
		*status = (int32_t)ld32(m);
		m += 4;
	}
	*stamp = ld64(m);
	return 0;
}

int wire_decode_error(const uint8_t *m, size_t len, const wire_limits *lim, uint32_t *code,
		      const char **msg, uint32_t *msg_len)
{
	if (len < 8)
		return -EPROTO;
	*code = ld32(m);
	*msg_len = ld32(m + 4);
	if (*msg_len > lim->max_msg)
		return -EMSGSIZE;
	if (len != 8 + (size_t)*msg_len)
		return -EPROTO;
	*msg = (const char *)m + 8;
	return 0;
}

int wire_decode_blocks_req(const uint8_t *m, size_t len, uint32_t bulk_len, int is_put,
			   const wire_limits *lim, wire_blocks_view *v)
{
	if (len < 8)
		return -EPROTO;
	uint32_t n = ld32(m);
	if (ld32(m + 4) != 0)
		return -EPROTO;
	if (n == 0)
		return -EPROTO;
	if (n > lim->max_blocks)
		return -EMSGSIZE;
	if (len != wire_blocks_req_size(n))
		return -EPROTO;
	uint64_t total = 0;
	const uint8_t *e = m + 8;
	for (uint32_t i = 0; i < n; i++, e += BLOCK_REF_LEN) {
		if (!handle_ok(e))
			return -EPROTO;
		uint32_t off = ld32(e + 12), l = ld32(e + 16);
		if (l == 0)
			return -EPROTO;
		if (l > lim->max_block_bytes || (uint64_t)off + l > lim->max_block_bytes)
			return -EMSGSIZE;
		total += l;
	}
	/* A GET's reply carries up to `total` bulk bytes: it must fit one frame. */
	if (total > lim->max_bulk)
		return -EMSGSIZE;
	if (is_put ? total != bulk_len : bulk_len != 0)
		return -EPROTO;
	v->n = n;
	v->entries = m + 8;
	v->total_bytes = total;
	return 0;
}

void wire_blocks_ref(const wire_blocks_view *v, uint32_t i, wire_block_ref *r)
{
	const uint8_t *e = v->entries + (size_t)i * BLOCK_REF_LEN;
	get_handle(e, &r->h);
	r->offset = ld32(e + 12);
	r->len = ld32(e + 16);
}

int wire_decode_status_reply(const uint8_t *m, size_t len, const wire_limits *lim, wire_status_view *v)
{
	if (len < 8)
		return -EPROTO;
	uint32_t n = ld32(m + 4);
	if (n > lim->max_blocks && n > lim->max_queries)
		return -EMSGSIZE;
	if (len != wire_status_reply_size(n))
		return -EPROTO;
	v->status = ld32(m);
	v->n = n;
	v->st = m + 8;
	return 0;
}

uint32_t wire_status_at(const wire_status_view *v, uint32_t i)
{
	return ld32(v->st + (size_t)i * 4);
}

int wire_decode_append_req(const uint8_t *m, size_t len, uint32_t bulk_len, const wire_limits *lim,
			   wire_append_view *v)
{
	if (len < 8)
		return -EPROTO;
	uint32_t n = ld32(m);
	if (ld32(m + 4) != 0 || n == 0)
		return -EPROTO;
	if (n > lim->max_blocks)
		return -EMSGSIZE;
	if (len != wire_append_req_size(n))
		return -EPROTO;
	uint64_t total = 0;
	const uint8_t *e = m + 8;
	for (uint32_t i = 0; i < n; i++, e += APPEND_REF_LEN) {
		if (!handle_ok(e))
			return -EPROTO;
		uint32_t nt = ld32(e + 20), bytes = ld32(e + 24);
		if (nt == 0 || bytes == 0)
			return -EPROTO;
		if (bytes > lim->max_block_bytes)
			return -EMSGSIZE;
		total += 2 * (uint64_t)bytes;
	}
	if (total != bulk_len)
		return -EPROTO;
	v->n = n;
	v->entries = m + 8;
	v->total_bytes = total;
	return 0;
}

void wire_append_at(const wire_append_view *v, uint32_t i, wire_append_ref *r)
{
	const uint8_t *e = v->entries + (size_t)i * APPEND_REF_LEN;
	get_handle(e, &r->h);
	r->layer = ld32(e + 12);
	r->token = ld32(e + 16);
	r->n_tokens = ld32(e + 20);
	r->bytes = ld32(e + 24);
}

int wire_decode_attend_req(const uint8_t *m, size_t len, uint32_t bulk_len, const wire_limits *lim,
			   wire_attend_view *v)
{
	if (len < SHAPE_LEN + 4)
		return -EPROTO;
	wire_shape *s = &v->shape;
	s->q_heads = ld32(m);
	s->kv_heads = ld32(m + 4);
	s->head_dim = ld32(m + 8);
	s->block_tokens = ld32(m + 12);
	s->layer = ld32(m + 16);
	s->kv_dtype = ld32(m + 20);
	uint32_t sc = ld32(m + 24);
	memcpy(&s->scale, &sc, 4);
	uint32_t nq = ld32(m + 28);
	if (s->q_heads > lim->max_heads || s->head_dim > lim->max_head_dim || nq > lim->max_queries)
		return -EMSGSIZE;
	if (s->q_heads == 0 || s->kv_heads == 0 || s->head_dim == 0 || s->block_tokens == 0 ||
	    s->kv_heads > s->q_heads || s->q_heads % s->kv_heads != 0 || s->kv_dtype > 2 ||
	    !isfinite(s->scale) || !(s->scale > 0.0f) || nq == 0)
		return -EPROTO;
	uint64_t qbytes = (uint64_t)nq * s->q_heads * s->head_dim * 4;
	if (qbytes > lim->max_bulk || wire_attend_reply_bulk(s, nq) > lim->max_bulk)
		return -EMSGSIZE;
	if (qbytes != bulk_len)
		return -EPROTO;
	/* Walk every query record once, so the iterator can trust them later. */
	const uint8_t *p = m + SHAPE_LEN + 4, *end = m + len;
	uint64_t handles = 0;
	for (uint32_t i = 0; i < nq; i++) {
		if ((size_t)(end - p) < ATTEND_Q_LEN)
			return -EPROTO;
		uint32_t nt = ld32(p), nb = ld32(p + 4);
		if (nb > lim->max_blocks)
			return -EMSGSIZE;
		handles += nb;
		if (handles > lim->max_blocks)
			return -EMSGSIZE;
		/* n_tokens must fit the blocks: (nb-1)*bt < nt <= nb*bt, or both 0.
		 * A query naming a whole sequence (one handle in arena
		 * WIRE_ARENA_SEQUENCE) carries the sequence's length, >= 1. */
		int whole = nb == 1 && (size_t)(end - p) >= ATTEND_Q_LEN + HANDLE_LEN &&
			    p[ATTEND_Q_LEN + 8] == WIRE_ARENA_SEQUENCE;
		if (whole ? nt == 0
			  : nb == 0 ? nt != 0
				    : (nt > (uint64_t)nb * s->block_tokens ||
				       nt <= (uint64_t)(nb - 1) * s->block_tokens))
			return -EPROTO;
		p += ATTEND_Q_LEN;
		if ((size_t)(end - p) < (size_t)nb * HANDLE_LEN)
			return -EPROTO;
		for (uint32_t j = 0; j < nb; j++, p += HANDLE_LEN)
			if (!handle_ok(p))
				return -EPROTO;
	}
	if (p != end)
		return -EPROTO;
	v->n_queries = nq;
	v->total_handles = (uint32_t)handles;
	v->queries = m + SHAPE_LEN + 4;
	v->end = end;
	return 0;
}

int wire_attend_next(const wire_attend_view *v, const uint8_t **cur, wire_attend_query *q)
{
	const uint8_t *p = *cur;
	if (p >= v->end)
		return -ENOENT;
	q->n_tokens = ld32(p);
	q->n_blocks = ld32(p + 4);
	q->handles = p + ATTEND_Q_LEN;
	*cur = p + ATTEND_Q_LEN + (size_t)q->n_blocks * HANDLE_LEN;
	return 0;
}

void wire_attend_handle(const wire_attend_query *q, uint32_t i, wire_handle *h)
{
	get_handle(q->handles + (size_t)i * HANDLE_LEN, h);
}

/* ---- whole frame (fuzzer, tests) ---------------------------------------------- */

int wire_frame_seal(uint8_t *buf, size_t len, const wire_limits *lim)
{
	wire_header h;
	if (len < WIRE_HDR_LEN)
		return -EPROTO;
	int rc = wire_decode_header(buf, lim, &h);
	if (rc)
		return rc;
	if (len - WIRE_HDR_LEN < (uint64_t)h.meta_len + h.bulk_len)
		return -EPROTO;
	const uint8_t *m = buf + WIRE_HDR_LEN, *b = m + h.meta_len;
	h.bulk_csum = 0;
	wire_blocks_view v;
	if (h.bulk_len && !(h.flags & WIRE_F_BULK_NOCSUM)) {
		if (h.opcode == WIRE_OP_PUT_BLOCKS && !(h.flags & WIRE_F_REPLY) &&
		    wire_decode_blocks_req(m, h.meta_len, h.bulk_len, 1, lim, &v) == 0) {
			wire_csum_state cs;
			wire_csum_init(&cs);
			for (uint32_t i = 0; i < v.n; i++) {
				wire_block_ref r;
				wire_blocks_ref(&v, i, &r);
				uint64_t x = xxh3(b, r.len);
				wire_csum_update(&cs, &x, 8);
				b += r.len;
			}
			h.bulk_csum = wire_csum_final(&cs);
		} else {
			uint64_t one = xxh3(b, h.bulk_len);
			h.bulk_csum = wire_csum_combine(&one, 1);
		}
	}
	wire_encode_header(&h, buf);
	h.meta_csum = wire_csum_meta(buf, m, h.meta_len);
	wire_encode_header(&h, buf);
	return 0;
}

int wire_decode_frame(const uint8_t *buf, size_t len, const wire_limits *lim)
{
	wire_header h;
	if (len < WIRE_HDR_LEN)
		return -EPROTO;
	int rc = wire_decode_header(buf, lim, &h);
	if (rc)
		return rc;
	if (len - WIRE_HDR_LEN < h.meta_len)
		return -EPROTO;
	const uint8_t *m = buf + WIRE_HDR_LEN;
	int have_bulk = len - WIRE_HDR_LEN - h.meta_len >= h.bulk_len;
	if (wire_csum_meta(buf, m, h.meta_len) != h.meta_csum)
		return -EBADMSG;
	int reply = !!(h.flags & WIRE_F_REPLY);
	if (have_bulk && h.bulk_len && !(h.flags & WIRE_F_BULK_NOCSUM) && !wire_bulk_segmented(h.opcode, h.flags)) {
		uint64_t one = xxh3(m + h.meta_len, h.bulk_len);
		if (wire_csum_combine(&one, 1) != h.bulk_csum)
			return -EBADMSG;
	}
	int32_t status;
	switch (h.opcode) {
	case WIRE_OP_HELLO: {
		wire_hello hh;
		return h.bulk_len ? -EPROTO : wire_decode_hello(m, h.meta_len, reply, lim, &status, &hh);
	}
	case WIRE_OP_PING: {
		uint64_t st;
		return h.bulk_len ? -EPROTO : wire_decode_ping(m, h.meta_len, reply, &status, &st);
	}
	case WIRE_OP_ERROR: {
		uint32_t code, ml;
		const char *msg;
		return h.bulk_len ? -EPROTO : wire_decode_error(m, h.meta_len, lim, &code, &msg, &ml);
	}
	default:
		break;
	}
	if (reply) {
		wire_status_view sv;
		rc = wire_decode_status_reply(m, h.meta_len, lim, &sv);
		if (rc)
			return rc;
		uint32_t sum = 0;
		for (uint32_t i = 0; i < sv.n; i++)
			sum += wire_status_at(&sv, i);
		return sum == 0xFFFFFFFFu ? 1 : 0; /* keep the loop */
	}
	switch (h.opcode) {
	case WIRE_OP_GET_BLOCKS:
	case WIRE_OP_PUT_BLOCKS: {
		wire_blocks_view v;
		rc = wire_decode_blocks_req(m, h.meta_len, h.bulk_len, h.opcode == WIRE_OP_PUT_BLOCKS, lim, &v);
		if (rc)
			return rc;
		wire_block_ref r;
		int check = h.opcode == WIRE_OP_PUT_BLOCKS && have_bulk && !(h.flags & WIRE_F_BULK_NOCSUM);
		wire_csum_state cs; /* the combine, streamed: XXH3 of the segment hashes */
		wire_csum_init(&cs);
		const uint8_t *b = m + h.meta_len;
		for (uint32_t i = 0; i < v.n; i++) {
			wire_blocks_ref(&v, i, &r);
			if (check) {
				uint64_t seg = xxh3(b, r.len);
				wire_csum_update(&cs, &seg, 8);
				b += r.len;
			}
		}
		if (check && wire_csum_final(&cs) != h.bulk_csum)
			return -EBADMSG;
		return 0;
	}
	case WIRE_OP_APPEND_KV: {
		wire_append_view v;
		rc = wire_decode_append_req(m, h.meta_len, h.bulk_len, lim, &v);
		if (rc)
			return rc;
		wire_append_ref r;
		for (uint32_t i = 0; i < v.n; i++)
			wire_append_at(&v, i, &r);
		return 0;
	}
	case WIRE_OP_ATTEND: {
		wire_attend_view v;
		rc = wire_decode_attend_req(m, h.meta_len, h.bulk_len, lim, &v);
		if (rc)
			return rc;
		const uint8_t *cur = v.queries;
		wire_attend_query q;
		wire_handle hd;
		uint32_t nq = 0;
		while (wire_attend_next(&v, &cur, &q) == 0) {
			for (uint32_t j = 0; j < q.n_blocks; j++)
				wire_attend_handle(&q, j, &hd);
			nq++;
		}
		return nq == v.n_queries ? 0 : -EPROTO;
	}
	default:
		return -EOPNOTSUPP;
	}
}
