/* kvmesh data-plane wire format: frames, limits, encoders and decoders.
 * The byte layout is specified in docs/wire.md; this header is its C side.
 *
 * A frame is a fixed 40-byte header, then `meta_len` bytes of structured
 * metadata (counts, handles, shapes, statuses), then `bulk_len` bytes of raw
 * payload (block bytes, queries, (o, lse)). Metadata is small and always read
 * into a transport-owned buffer; bulk bytes move straight between the socket
 * and caller buffers (arena slots) with readv/writev.
 *
 * Everything is little-endian. Decoders never allocate and never trust a
 * length: every count and length is checked against a wire_limits before the
 * caller allocates anything from it. They return 0 or a negative errno:
 *   -EPROTO           malformed (bad magic, reserved bits, sizes inconsistent)
 *   -EPROTONOSUPPORT  unknown version
 *   -EOPNOTSUPP       unknown opcode
 *   -EMSGSIZE         a length or count above the limits
 *   -EBADMSG          checksum mismatch
 * Encoders write into caller-provided buffers and return the bytes written or
 * -ENOSPC / -EMSGSIZE / -EINVAL; they never allocate either.
 *
 * Checksums are XXH3-64 (libxxhash, seed 0): meta_csum covers header bytes
 * [0, 24) and the metadata, so the header and metadata are verified before
 * anything is acted upon. bulk_csum covers the bulk as segments: it is the
 * XXH3-64 of the little-endian array of each segment's XXH3-64. The segments
 * are the block entries for GET_BLOCKS replies and PUT_BLOCKS requests (so a
 * store can keep one checksum per immutable block, computed once, and serve
 * it without rehashing), and the whole bulk for every other frame. bulk_csum
 * is 0 and unchecked when the sender sets WIRE_F_BULK_NOCSUM. */
#ifndef KVMESH_TRANSPORT_WIRE_H
#define KVMESH_TRANSPORT_WIRE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvmesh wire code assumes a little-endian host (bulk fp32 arrays are used in place)"
#endif

#define WIRE_MAGIC 0x314D564Bu /* bytes "KVM1" */
#define WIRE_VERSION 1
#define WIRE_HDR_LEN 40

enum wire_op {
	WIRE_OP_HELLO = 1,
	WIRE_OP_PING = 2,
	WIRE_OP_ERROR = 3,
	WIRE_OP_GET_BLOCKS = 4,
	WIRE_OP_PUT_BLOCKS = 5,
	WIRE_OP_ATTEND = 6,
	WIRE_OP_APPEND_KV = 7,
	WIRE_OP_MAX_ = 7,
};

#define WIRE_F_REPLY 0x0001u       /* a reply to the request with the same id */
#define WIRE_F_BULK_NOCSUM 0x0002u /* bulk_csum not computed (must be 0) */
#define WIRE_F_KNOWN_ (WIRE_F_REPLY | WIRE_F_BULK_NOCSUM)

/* Capability bits exchanged in HELLO. */
#define WIRE_CAP_TCP 0x1ull
#define WIRE_CAP_RDMA 0x2ull
#define WIRE_CAP_ATTEND 0x4ull

/* Wire error codes (ERROR frames and per-entry statuses carry these, not the
 * host's errno numbers). wire_err_from_errno/wire_err_to_errno convert. */
enum wire_err {
	WIRE_E_OK = 0,
	WIRE_E_INVAL = 1,     /* malformed request */
	WIRE_E_NOENT = 2,     /* no such block */
	WIRE_E_STALE = 3,     /* handle generation does not match the slot */
	WIRE_E_NOMEM = 4,     /* out of memory or slots */
	WIRE_E_TOOBIG = 5,    /* a length or count above the limits */
	WIRE_E_CHECKSUM = 6,  /* checksum mismatch */
	WIRE_E_OPCODE = 7,    /* unknown opcode */
	WIRE_E_VERSION = 8,   /* unsupported version */
	WIRE_E_NOTSUP = 9,    /* operation not offered by this node */
	WIRE_E_INTERNAL = 10, /* anything else */
	WIRE_E_BUSY = 11,     /* try again later */
	WIRE_E_RANGE = 12,    /* offset/length outside the block */
	WIRE_E_DENIED = 13,   /* HELLO refused (authentication, policy) */
	WIRE_E_MOVED = 14,    /* the sequence's home is another node now: ask the coordinator */
	WIRE_E_DEGRADED = 15, /* the sequence lost KV (a node died or restarted): not served */
};
uint32_t wire_err_from_errno(int neg_errno);
int wire_err_to_errno(uint32_t code);

/* Limits a node applies to what it receives. wire_limits_default() gives the
 * defaults documented in docs/wire.md. */
typedef struct wire_limits {
	uint32_t max_meta;        /* metadata bytes of one frame */
	uint32_t max_bulk;        /* bulk bytes of one frame (incl. a GET reply) */
	uint32_t max_blocks;      /* block entries (or handles) in one request */
	uint32_t max_block_bytes; /* bytes of one block entry */
	uint32_t max_queries;     /* queries in one ATTEND */
	uint32_t max_heads;       /* q_heads of ATTEND */
	uint32_t max_head_dim;    /* head_dim of ATTEND */
	uint32_t max_msg;         /* ERROR message / HELLO auth bytes */
} wire_limits;
void wire_limits_default(wire_limits *l);

typedef struct wire_header {
	uint32_t magic;
	uint8_t version;
	uint8_t opcode;
	uint16_t flags;
	uint64_t req_id;
	uint32_t meta_len;
	uint32_t bulk_len;
	uint64_t meta_csum;
	uint64_t bulk_csum;
} wire_header;

/* A block handle: a slot of an arena (tier) and the slot's generation. */
typedef struct wire_handle {
	uint32_t slot;
	uint32_t gen;
	uint8_t arena;
} wire_handle;

/* Arena 64 names a sequence, not a slot: slot = low 32 bits and gen = high
 * 32 bits of its data_id (XXH3-64 of the sequence id). APPEND_KV and ATTEND
 * on such a handle go to the sequence's home agent (docs/wire.md). */
#define WIRE_ARENA_SEQUENCE 64

/* A byte range of one block: GET_BLOCKS and PUT_BLOCKS entries. */
typedef struct wire_block_ref {
	wire_handle h;
	uint32_t offset;
	uint32_t len;
} wire_block_ref;

/* One APPEND_KV entry: n_tokens tokens of one layer at token position
 * `token` of the block; k and v are `bytes` bytes each in the bulk. */
typedef struct wire_append_ref {
	wire_handle h;
	uint32_t layer;
	uint32_t token;
	uint32_t n_tokens;
	uint32_t bytes;
} wire_append_ref;

/* The shape of an ATTEND batch (mirrors da_shape; kv_dtype uses da_dtype's
 * values). */
typedef struct wire_shape {
	uint32_t q_heads, kv_heads, head_dim, block_tokens, layer, kv_dtype;
	float scale;
} wire_shape;

typedef struct wire_hello {
	uint64_t node_id;
	uint64_t caps;
	uint16_t ver_min, ver_max;
	uint16_t auth_len;
	const uint8_t *auth; /* the cluster token (docs/wire.md); decoded: points into the buffer */
} wire_hello;

/* ---- header -------------------------------------------------------------- */

/* Writes a header to out[WIRE_HDR_LEN]. */
void wire_encode_header(const wire_header *h, uint8_t out[WIRE_HDR_LEN]);

/* Decodes and checks a header against the limits: magic, version, known
 * opcode and flags, meta_len/bulk_len within limits. The checksums are only
 * parsed; verify them with wire_csum_meta/bulk once the bytes have arrived. */
int wire_decode_header(const uint8_t in[WIRE_HDR_LEN], const wire_limits *lim, wire_header *out);

/* XXH3-64 over header bytes [0,24) of `hdr` then meta. */
uint64_t wire_csum_meta(const uint8_t hdr[WIRE_HDR_LEN], const void *meta, size_t meta_len);
/* XXH3-64 over the concatenation of the iovecs. */
uint64_t wire_csum_iov(const struct iovec *iov, int iovcnt);
/* XXH3-64 of n segment checksums as a little-endian u64 array: bulk_csum. */
uint64_t wire_csum_combine(const uint64_t *seg, uint32_t n);
/* Whether the bulk of a frame with this opcode and flags is checksummed per
 * entry (GET_BLOCKS replies, PUT_BLOCKS requests) rather than as a whole. */
int wire_bulk_segmented(uint8_t opcode, uint16_t flags);

/* Opaque streaming checksum state (heap-free; the caller embeds it anywhere:
 * it needs no particular alignment, the state is aligned inside it). */
typedef struct wire_csum_state {
	unsigned char opaque[640 + 64];
} wire_csum_state;
void wire_csum_init(wire_csum_state *s);
void wire_csum_update(wire_csum_state *s, const void *p, size_t n);
uint64_t wire_csum_final(const wire_csum_state *s);

/* ---- metadata sizes (for the encoder's buffer) ------------------------- */

size_t wire_hello_size(uint16_t auth_len);      /* request body; a reply adds 4 */
size_t wire_blocks_req_size(uint32_t n);        /* GET/PUT request */
size_t wire_status_reply_size(uint32_t n);      /* GET/PUT/ATTEND/APPEND reply */
size_t wire_append_req_size(uint32_t n);
/* ATTEND request metadata for n queries holding total_handles handles. */
size_t wire_attend_req_size(uint32_t n, uint32_t total_handles);
size_t wire_error_size(uint32_t msg_len);

/* ---- a bounded little-endian writer and reader ---------------------------- */

typedef struct wire_buf {
	uint8_t *p;
	size_t len, cap;
	int err; /* sticky -ENOSPC */
} wire_buf;
void wire_put_u8(wire_buf *b, uint8_t v);
void wire_put_u16(wire_buf *b, uint16_t v);
void wire_put_u32(wire_buf *b, uint32_t v);
void wire_put_u64(wire_buf *b, uint64_t v);
void wire_put_bytes(wire_buf *b, const void *p, size_t n);
void wire_put_handle(wire_buf *b, const wire_handle *h);

/* ---- encoders (metadata only; the bulk is the caller's iovecs) ----------- */

int wire_encode_hello(wire_buf *b, int is_reply, int32_t status, const wire_hello *h);
int wire_encode_ping(wire_buf *b, int is_reply, uint64_t stamp);
int wire_encode_error(wire_buf *b, uint32_t code, const char *msg, const wire_limits *lim);
/* GET/PUT request: n refs. */
int wire_encode_blocks_req(wire_buf *b, const wire_block_ref *refs, uint32_t n);
/* Any status reply: overall status and n per-entry wire error codes. */
int wire_encode_status_reply(wire_buf *b, uint32_t status, const uint32_t *st, uint32_t n);
int wire_encode_append_req(wire_buf *b, const wire_append_ref *refs, uint32_t n);
/* ATTEND request: the shape, then per query (n_tokens, n_blocks, handles).
 * Begin with the shape and count, then add each query. */
int wire_encode_attend_begin(wire_buf *b, const wire_shape *s, uint32_t n_queries);
int wire_encode_attend_query(wire_buf *b, uint32_t n_tokens, const wire_handle *h, uint32_t n_blocks);

/* ---- decoders over a complete metadata buffer ---------------------------- */
/* Each checks the whole metadata (sizes consistent with meta_len and, where
 * the bulk size follows from it, with bulk_len) and returns views into the
 * buffer; the buffer must outlive them. */

int wire_decode_hello(const uint8_t *m, size_t len, int is_reply, const wire_limits *lim,
		      int32_t *status, wire_hello *out);
int wire_decode_ping(const uint8_t *m, size_t len, int is_reply, int32_t *status, uint64_t *stamp);
int wire_decode_error(const uint8_t *m, size_t len, const wire_limits *lim, uint32_t *code,
		      const char **msg, uint32_t *msg_len);

typedef struct wire_blocks_view {
	uint32_t n;
	const uint8_t *entries; /* n entries of 20 bytes; read with wire_blocks_ref */
	uint64_t total_bytes;   /* sum of lengths */
} wire_blocks_view;
/* GET (expect_bulk = 0) or PUT (bulk_len must equal the sum of lengths). */
int wire_decode_blocks_req(const uint8_t *m, size_t len, uint32_t bulk_len, int is_put,
			   const wire_limits *lim, wire_blocks_view *out);
void wire_blocks_ref(const wire_blocks_view *v, uint32_t i, wire_block_ref *out);

typedef struct wire_status_view {
	uint32_t status;
	uint32_t n;
	const uint8_t *st; /* n u32 codes; read with wire_status_at */
} wire_status_view;
int wire_decode_status_reply(const uint8_t *m, size_t len, const wire_limits *lim, wire_status_view *out);
uint32_t wire_status_at(const wire_status_view *v, uint32_t i);

typedef struct wire_append_view {
	uint32_t n;
	const uint8_t *entries; /* n entries of 28 bytes */
	uint64_t total_bytes;   /* bulk bytes: sum of 2 * bytes */
} wire_append_view;
int wire_decode_append_req(const uint8_t *m, size_t len, uint32_t bulk_len, const wire_limits *lim,
			   wire_append_view *out);
void wire_append_at(const wire_append_view *v, uint32_t i, wire_append_ref *out);

typedef struct wire_attend_view {
	wire_shape shape;
	uint32_t n_queries;
	uint32_t total_handles;
	const uint8_t *queries; /* the per-query records, walked by wire_attend_next */
	const uint8_t *end;
} wire_attend_view;
typedef struct wire_attend_query {
	uint32_t n_tokens;
	uint32_t n_blocks;
	const uint8_t *handles; /* n_blocks handles of 12 bytes; wire_attend_handle */
} wire_attend_query;
/* Checks the shape, counts, every query record, and that bulk_len equals
 * n_queries * q_heads * head_dim * 4 (the queries). */
int wire_decode_attend_req(const uint8_t *m, size_t len, uint32_t bulk_len, const wire_limits *lim,
			   wire_attend_view *out);
/* Iterates queries of a decoded view; *cursor starts at v->queries. Returns
 * 0, or -ENOENT past the last one. */
int wire_attend_next(const wire_attend_view *v, const uint8_t **cursor, wire_attend_query *q);
void wire_attend_handle(const wire_attend_query *q, uint32_t i, wire_handle *out);

/* Bytes of the ATTEND reply bulk for n queries of this shape: per query
 * o[q_heads][head_dim] then lse[q_heads], fp32. */
uint64_t wire_attend_reply_bulk(const wire_shape *s, uint32_t n_queries);

/* Decodes header + metadata of a whole frame held in one buffer (used by the
 * fuzzer and tests): checks everything the transport checks, including both
 * checksums when the bulk is present in the buffer (except a GET_BLOCKS
 * reply's bulk, whose segment lengths come from the request). Returns 0 or
 * -errno. */
int wire_decode_frame(const uint8_t *buf, size_t len, const wire_limits *lim);

/* Fills in both checksums of a whole frame held in buf (header, metadata,
 * bulk): for tests, tools and the fuzzer. A GET_BLOCKS reply's bulk is taken
 * as one segment (right for one entry). Returns 0 or -errno. */
int wire_frame_seal(uint8_t *buf, size_t len, const wire_limits *lim);

const char *wire_op_name(uint8_t op);

#endif
