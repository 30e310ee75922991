#include "kvstore/key.h"

#include <string.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvstore keys hash little-endian words; add byte swaps for this host"
#endif

/* Up to this many tokens the input is hashed in one shot from a stack
 * buffer; longer blocks use the streaming API (same digest). */
#define KEY_STACK_TOKENS 512

kvs_key kvs_key_chain(kvs_key parent, uint64_t model, const uint32_t *tokens, uint32_t n)
{
	uint64_t head[3] = {parent.lo, parent.hi, model};
	XXH128_hash_t h;

	if (n <= KEY_STACK_TOKENS) {
		unsigned char buf[sizeof head + KEY_STACK_TOKENS * sizeof(uint32_t)];
		memcpy(buf, head, sizeof head);
		if (n)
			memcpy(buf + sizeof head, tokens, (size_t)n * sizeof(uint32_t));
		h = XXH3_128bits(buf, sizeof head + (size_t)n * sizeof(uint32_t));
	} else {
		/* On the stack: key derivation never allocates and cannot fail. */
		XXH3_state_t st;
		XXH3_INITSTATE(&st);
		XXH3_128bits_reset(&st);
		XXH3_128bits_update(&st, head, sizeof head);
		XXH3_128bits_update(&st, tokens, (size_t)n * sizeof(uint32_t));
		h = XXH3_128bits_digest(&st);
	}
	return (kvs_key){h.low64, h.high64};
}

void kvs_key_to_bytes(kvs_key k, uint8_t out[16])
{
	for (int i = 0; i < 8; i++) {
		out[i] = (uint8_t)(k.lo >> (8 * i));
		out[8 + i] = (uint8_t)(k.hi >> (8 * i));
	}
}

kvs_key kvs_key_from_bytes(const uint8_t in[16])
{
	kvs_key k = {0, 0};
	for (int i = 0; i < 8; i++) {
		k.lo |= (uint64_t)in[i] << (8 * i);
		k.hi |= (uint64_t)in[8 + i] << (8 * i);
	}
	return k;
}
