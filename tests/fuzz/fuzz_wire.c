/* libFuzzer target: the frame decoder (header, limits, checksums, every
 * operation's metadata). Built by `make fuzz`, run by `make fuzz-run`.
 *
 * The first input byte picks a mode: odd = recompute both checksums before
 * decoding, so the fuzzer reaches the metadata decoders instead of stopping
 * at the checksum; even = decode the bytes as they are. Small limits make
 * the limit checks reachable. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "transport/wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	wire_limits lim;
	wire_limits_default(&lim);
	lim.max_meta = 1u << 16;
	lim.max_bulk = 1u << 20;
	lim.max_blocks = 64;
	lim.max_block_bytes = 1u << 16;
	lim.max_queries = 16;
	lim.max_heads = 32;
	lim.max_head_dim = 128;
	lim.max_msg = 256;
	int fix = data[0] & 1;
	data++;
	size--;
	/* Copy so the decoder sees an exact-size heap buffer (ASan catches overreads). */
	uint8_t *buf = malloc(size ? size : 1);
	if (!buf)
		return 0;
	memcpy(buf, data, size);
	if (fix) {
		/* Seal the frame the input describes, up to its own lengths. */
		wire_header h;
		if (size >= WIRE_HDR_LEN && wire_decode_header(buf, &lim, &h) == 0 &&
		    size - WIRE_HDR_LEN >= (uint64_t)h.meta_len + h.bulk_len)
			(void)wire_frame_seal(buf, WIRE_HDR_LEN + (size_t)h.meta_len + h.bulk_len, &lim);
		else if (size >= WIRE_HDR_LEN && wire_decode_header(buf, &lim, &h) == 0 &&
			 size - WIRE_HDR_LEN >= h.meta_len) {
			/* No complete bulk: fix the metadata checksum only. */
			h.meta_csum = 0;
			wire_encode_header(&h, buf);
			h.meta_csum = wire_csum_meta(buf, buf + WIRE_HDR_LEN, h.meta_len);
			wire_encode_header(&h, buf);
		}
	}
	(void)wire_decode_frame(buf, size, &lim);
	free(buf);
	return 0;
}
