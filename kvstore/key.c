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
