/* Wire format: encoders and decoders, limits checked before allocation. */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "transport/wire.h"

static wire_limits lim;
static void setup(void)
{
	wire_limits_default(&lim);
}
TestSuite(wire, .init = setup, .timeout = 20);

/* Builds a complete frame (header + meta + bulk) into buf; returns its size. */
static size_t frame(uint8_t *buf, uint8_t op, uint16_t flags, const uint8_t *meta, uint32_t ml, const uint8_t *bulk,
		    uint32_t bl)
{
	wire_header h = {.magic = WIRE_MAGIC, .version = WIRE_VERSION, .opcode = op, .flags = flags, .req_id = 7,
			 .meta_len = ml, .bulk_len = bl};
	memcpy(buf + WIRE_HDR_LEN, meta, ml);
	memcpy(buf + WIRE_HDR_LEN + ml, bulk, bl);
	wire_encode_header(&h, buf);
	cr_assert_eq(wire_frame_seal(buf, WIRE_HDR_LEN + ml + bl, &lim), 0);
	return WIRE_HDR_LEN + ml + bl;
}

Test(wire, header_roundtrip)
{
	wire_header h = {.magic = WIRE_MAGIC, .version = 1, .opcode = WIRE_OP_ATTEND, .flags = WIRE_F_REPLY,
			 .req_id = 0x0102030405060708ull, .meta_len = 100, .bulk_len = 200, .meta_csum = 1, .bulk_csum = 2};
	uint8_t b[WIRE_HDR_LEN];
	wire_encode_header(&h, b);
	cr_assert_eq(b[0], 'K');
	cr_assert_eq(b[3], '1');
	cr_assert_eq(b[8], 0x08); /* little-endian */
	wire_header o;
	cr_assert_eq(wire_decode_header(b, &lim, &o), 0);
	cr_assert_eq(o.req_id, h.req_id);
	cr_assert_eq(o.meta_len, 100);
	cr_assert_eq(o.bulk_len, 200);
	cr_assert_eq(o.bulk_csum, 2);
}

Test(wire, header_rejections)
{
	wire_header h = {.magic = WIRE_MAGIC, .version = 1, .opcode = WIRE_OP_PING};
	uint8_t b[WIRE_HDR_LEN];
	wire_header o;
	h.magic = 0x12345678;
	wire_encode_header(&h, b);
	cr_assert_eq(wire_decode_header(b, &lim, &o), -EPROTO);
	h.magic = WIRE_MAGIC;
	h.version = 2;
	wire_encode_header(&h, b);
	cr_assert_eq(wire_decode_header(b, &lim, &o), -EPROTONOSUPPORT);
	h.version = 1;
	h.opcode = 99;
	wire_encode_header(&h, b);
	cr_assert_eq(wire_decode_header(b, &lim, &o), -EOPNOTSUPP);
	h.opcode = 0;
	wire_encode_header(&h, b);
	cr_assert_eq(wire_decode_header(b, &lim, &o), -EOPNOTSUPP);
	h.opcode = WIRE_OP_PING;
	h.flags = 0x8000;
	wire_encode_header(&h, b);
	cr_assert_eq(wire_decode_header(b, &lim, &o), -EPROTO);
	h.flags = 0;
	h.meta_len = 0xFFFFFFFFu;
	wire_encode_header(&h, b);
	cr_assert_eq(wire_decode_header(b, &lim, &o), -EMSGSIZE);
	h.meta_len = 0;
	h.bulk_len = lim.max_bulk + 1;
	wire_encode_header(&h, b);
	cr_assert_eq(wire_decode_header(b, &lim, &o), -EMSGSIZE);
}

Test(wire, blocks_roundtrip_and_limits)
{
	wire_block_ref refs[3] = {{{1, 2, 0}, 0, 4096}, {{5, 9, 1}, 4096, 8192}, {{7, 1, 0}, 0, 1}};
	uint8_t m[256];
	wire_buf b = {.p = m, .cap = sizeof m};
	cr_assert_eq(wire_encode_blocks_req(&b, refs, 3), 0);
	cr_assert_eq(b.len, wire_blocks_req_size(3));
	wire_blocks_view v;
	cr_assert_eq(wire_decode_blocks_req(m, b.len, 0, 0, &lim, &v), 0);
	cr_assert_eq(v.n, 3);
	cr_assert_eq(v.total_bytes, 4096 + 8192 + 1);
	wire_block_ref r;
	wire_blocks_ref(&v, 1, &r);
	cr_assert(r.h.slot == 5 && r.h.gen == 9 && r.h.arena == 1 && r.offset == 4096 && r.len == 8192);
	/* PUT: the bulk must match the lengths. */
	cr_assert_eq(wire_decode_blocks_req(m, b.len, 12289, 1, &lim, &v), 0);
	cr_assert_eq(wire_decode_blocks_req(m, b.len, 12288, 1, &lim, &v), -EPROTO);
	/* GET with bulk. */
	cr_assert_eq(wire_decode_blocks_req(m, b.len, 1, 0, &lim, &v), -EPROTO);
	/* Truncated. */
	cr_assert_eq(wire_decode_blocks_req(m, b.len - 1, 0, 0, &lim, &v), -EPROTO);
	/* A count above the limit is refused from the count alone. */
	uint8_t big[8] = {0};
	uint32_t n = lim.max_blocks + 1;
	memcpy(big, &n, 4);
	cr_assert_eq(wire_decode_blocks_req(big, 8, 0, 0, &lim, &v), -EMSGSIZE);
	/* A length above the limit. */
	refs[0].len = lim.max_block_bytes + 1;
	b.len = 0;
	wire_encode_blocks_req(&b, refs, 1);
	cr_assert_eq(wire_decode_blocks_req(m, b.len, 0, 0, &lim, &v), -EMSGSIZE);
	/* Reserved handle bytes must be zero. */
	refs[0].len = 10;
	b.len = 0;
	wire_encode_blocks_req(&b, refs, 1);
	m[8 + 9] = 1;
	cr_assert_eq(wire_decode_blocks_req(m, b.len, 0, 0, &lim, &v), -EPROTO);
}

Test(wire, attend_roundtrip_and_checks)
{
	wire_shape s = {.q_heads = 8, .kv_heads = 2, .head_dim = 64, .block_tokens = 16, .layer = 3, .kv_dtype = 1,
			.scale = 0.125f};
	wire_handle hs[3] = {{1, 1, 0}, {2, 1, 0}, {3, 4, 0}};
	uint8_t m[512];
	wire_buf b = {.p = m, .cap = sizeof m};
	wire_encode_attend_begin(&b, &s, 2);
	wire_encode_attend_query(&b, 40, hs, 3);
	wire_encode_attend_query(&b, 0, NULL, 0);
	cr_assert_eq(b.err, 0);
	cr_assert_eq(b.len, wire_attend_req_size(2, 3));
	uint32_t qbytes = 2 * 8 * 64 * 4;
	wire_attend_view v;
	cr_assert_eq(wire_decode_attend_req(m, b.len, qbytes, &lim, &v), 0);
	cr_assert_eq(v.n_queries, 2);
	cr_assert_eq(v.total_handles, 3);
	cr_assert_eq(v.shape.kv_dtype, 1);
	cr_assert_float_eq(v.shape.scale, 0.125f, 0);
	const uint8_t *cur = v.queries;
	wire_attend_query q;
	cr_assert_eq(wire_attend_next(&v, &cur, &q), 0);
	cr_assert_eq(q.n_tokens, 40);
	wire_handle h;
	wire_attend_handle(&q, 2, &h);
	cr_assert(h.slot == 3 && h.gen == 4);
	cr_assert_eq(wire_attend_next(&v, &cur, &q), 0);
	cr_assert_eq(q.n_blocks, 0);
	cr_assert_eq(wire_attend_next(&v, &cur, &q), -ENOENT);
	cr_assert_eq(wire_decode_attend_req(m, b.len, qbytes - 4, &lim, &v), -EPROTO);
	/* n_tokens that do not fit the blocks. */
	b.len = 0;
	wire_encode_attend_begin(&b, &s, 1);
	wire_encode_attend_query(&b, 49, hs, 3);
	cr_assert_eq(wire_decode_attend_req(m, b.len, qbytes / 2, &lim, &v), -EPROTO);
	/* Too many heads; heads that do not divide. */
	s.q_heads = lim.max_heads + 1;
	b.len = 0;
	wire_encode_attend_begin(&b, &s, 1);
	wire_encode_attend_query(&b, 1, hs, 1);
	cr_assert_eq(wire_decode_attend_req(m, b.len, 0, &lim, &v), -EMSGSIZE);
	s.q_heads = 6;
	s.kv_heads = 4;
	b.len = 0;
	wire_encode_attend_begin(&b, &s, 1);
	wire_encode_attend_query(&b, 1, hs, 1);
	cr_assert_eq(wire_decode_attend_req(m, b.len, 6 * 64 * 4, &lim, &v), -EPROTO);
}

Test(wire, hello_ping_error_append)
{
	uint8_t m[256];
	wire_buf b = {.p = m, .cap = sizeof m};
	uint8_t auth[4] = {1, 2, 3, 4};
	wire_hello h = {.node_id = 42, .caps = WIRE_CAP_TCP, .ver_min = 1, .ver_max = 1, .auth_len = 4, .auth = auth};
	cr_assert_eq(wire_encode_hello(&b, 1, 0, &h), 0);
	wire_hello o;
	int32_t st = 5;
	cr_assert_eq(wire_decode_hello(m, b.len, 1, &lim, &st, &o), 0);
	cr_assert(st == 0 && o.node_id == 42 && o.auth_len == 4 && o.auth[3] == 4);
	b.len = 0;
	wire_encode_error(&b, WIRE_E_STALE, "stale handle", &lim);
	uint32_t code, ml;
	const char *msg;
	cr_assert_eq(wire_decode_error(m, b.len, &lim, &code, &msg, &ml), 0);
	cr_assert(code == WIRE_E_STALE && ml == 12 && memcmp(msg, "stale handle", 12) == 0);
	cr_assert_eq(wire_err_to_errno(code), -ESTALE);
	cr_assert_eq(wire_err_from_errno(-ESTALE), WIRE_E_STALE);
	/* The per-entry codes a home answers round-trip to the client's errno. */
	for (uint32_t c = WIRE_E_MOVED; c <= WIRE_E_DEGRADED; c++)
		cr_assert_eq(wire_err_from_errno(wire_err_to_errno(c)), c, "code %u", c);
	cr_assert_eq(wire_err_to_errno(WIRE_E_DEGRADED), -ENODATA);
	b.len = 0;
	wire_append_ref a = {{3, 1, 0}, 2, 5, 1, 256};
	wire_encode_append_req(&b, &a, 1);
	wire_append_view av;
	cr_assert_eq(wire_decode_append_req(m, b.len, 512, &lim, &av), 0);
	wire_append_ref ao;
	wire_append_at(&av, 0, &ao);
	cr_assert(ao.layer == 2 && ao.token == 5 && ao.bytes == 256);
	cr_assert_eq(wire_decode_append_req(m, b.len, 256, &lim, &av), -EPROTO);
	uint64_t stamp;
	b.len = 0;
	wire_encode_ping(&b, 0, 99);
	cr_assert_eq(wire_decode_ping(m, b.len, 0, &st, &stamp), 0);
	cr_assert_eq(stamp, 99);
	/* The writer never runs past its buffer. */
	wire_buf small = {.p = m, .cap = 3};
	cr_assert_eq(wire_encode_ping(&small, 0, 1), -ENOSPC);
}

Test(wire, whole_frame_checksums)
{
	uint8_t meta[64], bulk[100], buf[512];
	wire_block_ref r = {{1, 1, 0}, 0, 100};
	wire_buf b = {.p = meta, .cap = sizeof meta};
	wire_encode_blocks_req(&b, &r, 1);
	memset(bulk, 0xab, sizeof bulk);
	size_t n = frame(buf, WIRE_OP_PUT_BLOCKS, 0, meta, (uint32_t)b.len, bulk, 100);
	cr_assert_eq(wire_decode_frame(buf, n, &lim), 0);
	buf[n - 1] ^= 1; /* bulk corrupted */
	cr_assert_eq(wire_decode_frame(buf, n, &lim), -EBADMSG);
	buf[n - 1] ^= 1;
	buf[WIRE_HDR_LEN + 3] ^= 1; /* meta corrupted */
	cr_assert_eq(wire_decode_frame(buf, n, &lim), -EBADMSG);
	buf[WIRE_HDR_LEN + 3] ^= 1;
	buf[12] ^= 1; /* request id corrupted: covered by the meta checksum */
	cr_assert_eq(wire_decode_frame(buf, n, &lim), -EBADMSG);
	buf[12] ^= 1;
	cr_assert_eq(wire_decode_frame(buf, 20, &lim), -EPROTO);
}

#include <stdlib.h>
#include <xxhash.h>

/* The AVX2 build of XXH3 and streaming over pieces agree with libxxhash. */
Test(wire, checksum_matches_libxxhash)
{
	size_t n = 3u << 20;
	uint8_t *b = malloc(n);
	for (size_t i = 0; i < n; i++)
		b[i] = (uint8_t)(i * 131 + (i >> 9));
	size_t lens[] = {0, 1, 17, 240, 241, 1024, 65536, 3u << 20};
	for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
		struct iovec iov = {b, lens[k]};
		cr_assert_eq(wire_csum_iov(&iov, 1), XXH3_64bits(b, lens[k]), "len %zu", lens[k]);
		struct iovec three[3] = {{b, lens[k] / 3}, {b + lens[k] / 3, lens[k] / 3},
					 {b + 2 * (lens[k] / 3), lens[k] - 2 * (lens[k] / 3)}};
		cr_assert_eq(wire_csum_iov(three, 3), XXH3_64bits(b, lens[k]), "pieces, len %zu", lens[k]);
	}
	free(b);
}

#include <dirent.h>
#include <stdio.h>

/* The committed seed corpus decodes: every valid frame passes, the one with
 * a bad length does not (run from the repository root, as `make test` does). */
Test(wire, seed_corpus_decodes)
{
	DIR *d = opendir("tests/fuzz/corpus/wire");
	if (!d)
		cr_skip_test("run from the repository root to find tests/fuzz/corpus/wire");
	struct dirent *e;
	int n = 0;
	static uint8_t buf[1 << 16];
	while ((e = readdir(d))) {
		size_t l = strlen(e->d_name);
		if (l < 2 || strcmp(e->d_name + l - 2, "-0") != 0)
			continue;
		char path[512];
		snprintf(path, sizeof path, "tests/fuzz/corpus/wire/%s", e->d_name);
		FILE *f = fopen(path, "rb");
		cr_assert(f);
		size_t got = fread(buf, 1, sizeof buf, f);
		fclose(f);
		int rc = wire_decode_frame(buf + 1, got - 1, &lim);
		if (strstr(e->d_name, "bad"))
			cr_assert_neq(rc, 0, "%s", e->d_name);
		else
			cr_assert_eq(rc, 0, "%s: %d", e->d_name, rc);
		n++;
	}
	closedir(d);
	cr_assert_geq(n, 10);
}
