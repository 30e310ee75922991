/* Writes the seed corpus of fuzz_wire (one valid frame per operation and
 * direction, with the mode byte first) into the folder given as argv[1].
 * The output is committed in tests/fuzz/corpus/wire; rerun after a wire change:
 *   cc -I. -D_GNU_SOURCE -mavx2 -c transport/csum_avx2.c -o /tmp/csum_avx2.o &&
 *   cc -I. -D_GNU_SOURCE tests/fuzz/gen_corpus.c transport/wire.c /tmp/csum_avx2.o -lxxhash -lm -o /tmp/gen &&
 *   /tmp/gen tests/fuzz/corpus/wire */
#include <stdio.h>
#include <string.h>

#include "transport/wire.h"

static uint8_t out[1 << 16];

static void emit(const char *dir, const char *name, uint8_t op, uint16_t flags, const uint8_t *meta, size_t ml,
		 const void *bulk, size_t bl)
{
	uint8_t *f = out + 1;
	wire_header h = {.magic = WIRE_MAGIC, .version = WIRE_VERSION, .opcode = op, .flags = flags, .req_id = 1,
			 .meta_len = (uint32_t)ml, .bulk_len = (uint32_t)bl};
	memcpy(f + WIRE_HDR_LEN, meta, ml);
	memcpy(f + WIRE_HDR_LEN + ml, bulk, bl);
	wire_encode_header(&h, f);
	wire_limits lim;
	wire_limits_default(&lim);
	wire_frame_seal(f, WIRE_HDR_LEN + ml + bl, &lim);
	for (int mode = 0; mode < 2; mode++) {
		out[0] = (uint8_t)mode;
		char path[512];
		snprintf(path, sizeof path, "%s/%s-%d", dir, name, mode);
		FILE *fp = fopen(path, "wb");
		if (!fp)
			return;
		fwrite(out, 1, 1 + WIRE_HDR_LEN + ml + bl, fp);
		fclose(fp);
	}
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	const char *d = argv[1];
	wire_limits lim;
	wire_limits_default(&lim);
	uint8_t m[4096], bulk[4096];
	memset(bulk, 0x5a, sizeof bulk);
	wire_buf b = {.p = m, .cap = sizeof m};
	uint8_t auth[3] = {1, 2, 3};
	wire_hello hl = {.node_id = 7, .caps = 5, .ver_min = 1, .ver_max = 1, .auth_len = 3, .auth = auth};
	wire_encode_hello(&b, 0, 0, &hl);
	emit(d, "hello", WIRE_OP_HELLO, 0, m, b.len, NULL, 0);
	b.len = 0;
	wire_encode_hello(&b, 1, 0, &hl);
	emit(d, "hello-reply", WIRE_OP_HELLO, WIRE_F_REPLY, m, b.len, NULL, 0);
	b.len = 0;
	wire_encode_ping(&b, 0, 123);
	emit(d, "ping", WIRE_OP_PING, 0, m, b.len, NULL, 0);
	b.len = 0;
	wire_encode_error(&b, WIRE_E_STALE, "stale", &lim);
	emit(d, "error", WIRE_OP_ERROR, WIRE_F_REPLY, m, b.len, NULL, 0);
	wire_block_ref refs[2] = {{{1, 2, 0}, 0, 100}, {{3, 4, 1}, 8, 28}};
	b.len = 0;
	wire_encode_blocks_req(&b, refs, 2);
	emit(d, "get", WIRE_OP_GET_BLOCKS, 0, m, b.len, NULL, 0);
	emit(d, "put", WIRE_OP_PUT_BLOCKS, 0, m, b.len, bulk, 128);
	emit(d, "put-bad-length", WIRE_OP_PUT_BLOCKS, 0, m, b.len, bulk, 127);
	emit(d, "put-nocsum", WIRE_OP_PUT_BLOCKS, WIRE_F_BULK_NOCSUM, m, b.len, bulk, 128);
	uint32_t st[2] = {0, WIRE_E_NOENT};
	b.len = 0;
	wire_encode_status_reply(&b, 0, st, 2);
	emit(d, "get-reply", WIRE_OP_GET_BLOCKS, WIRE_F_REPLY, m, b.len, bulk, 100);
	wire_append_ref a = {{5, 1, 0}, 2, 3, 1, 64};
	b.len = 0;
	wire_encode_append_req(&b, &a, 1);
	emit(d, "append", WIRE_OP_APPEND_KV, 0, m, b.len, bulk, 128);
	wire_shape s = {.q_heads = 4, .kv_heads = 2, .head_dim = 8, .block_tokens = 16, .layer = 1, .kv_dtype = 1,
			.scale = 0.35f};
	wire_handle hs[3] = {{1, 1, 0}, {2, 1, 0}, {9, 3, 1}};
	b.len = 0;
	wire_encode_attend_begin(&b, &s, 2);
	wire_encode_attend_query(&b, 20, hs, 2);
	wire_encode_attend_query(&b, 5, hs + 2, 1);
	emit(d, "attend", WIRE_OP_ATTEND, 0, m, b.len, bulk, 2 * 4 * 8 * 4);
	b.len = 0;
	wire_encode_status_reply(&b, 0, st, 2);
	emit(d, "attend-reply", WIRE_OP_ATTEND, WIRE_F_REPLY, m, b.len, bulk, 2 * 4 * 9 * 4);
	return 0;
}
