/* kvstore's prefix index (internal): random inserts and removals, with
 * crowded buckets, against a plain array. */
#include <criterion/criterion.h>
#include <errno.h>

#include "kvstore/index.h"

#define N 1000

struct rec {
	kvs_key key;
	int present;
};

Test(kvstore_index, random_churn_against_a_reference)
{
	static struct rec r[N];
	struct kvs_index ix;
	cr_assert_eq(kvs_index_init(&ix, N, r, sizeof r[0]), 0);
	uint64_t x = 12345;
	for (uint32_t i = 0; i < N; i++) {
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		/* Few distinct home buckets and some equal first words: long runs,
		 * wrap-around at the end of the table, and keys told apart by
		 * their second word only. */
		uint64_t lo = (x >> 20) % 7 == 0 ? 0xffffffffull - (x >> 60) : (x >> 33) % 256;
		if (i % 5 == 0 && i)
			lo = r[i - 1].key.lo;
		r[i].key = (kvs_key){lo, x ^ (x >> 7)};
	}
	for (int round = 0; round < 100000; round++) {
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		uint32_t i = (uint32_t)(x >> 33) % N;
		if (r[i].present) {
			cr_assert_eq(kvs_index_remove(&ix, r[i].key, i), 0);
			r[i].present = 0;
			cr_assert_eq(kvs_index_remove(&ix, r[i].key, i), -ENOENT);
		} else {
			cr_assert_eq(kvs_index_insert(&ix, r[i].key, i), 0);
			r[i].present = 1;
			cr_assert_eq(kvs_index_insert(&ix, r[i].key, i), -EEXIST);
		}
		if (round % 997 == 0) {
			uint32_t count = 0;
			for (uint32_t j = 0; j < N; j++) {
				uint32_t want = r[j].present ? j : KVS_INDEX_NONE;
				count += r[j].present;
				if (kvs_index_find(&ix, r[j].key) != want ||
				    kvs_index_probe(&ix, r[j].key) != want)
					cr_assert_fail("round %d key %u: lookup wrong", round, j);
			}
			cr_assert_eq(ix.count, count);
		}
	}
	cr_assert_eq(kvs_index_find(&ix, (kvs_key){7, 7}), KVS_INDEX_NONE);
	kvs_index_fini(&ix);
}

Test(kvstore_index, capacity_is_enforced)
{
	static struct rec r[4];
	struct kvs_index ix;
	cr_assert_eq(kvs_index_init(&ix, 3, r, sizeof r[0]), 0);
	for (uint32_t i = 0; i < 4; i++)
		r[i].key = (kvs_key){i, i};
	for (uint32_t i = 0; i < 3; i++)
		cr_assert_eq(kvs_index_insert(&ix, r[i].key, i), 0);
	cr_assert_eq(kvs_index_insert(&ix, r[3].key, 3), -ENOSPC);
	kvs_index_fini(&ix);
	cr_assert_eq(kvs_index_init(&ix, 0, r, sizeof r[0]), -EINVAL);
}
