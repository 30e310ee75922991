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

/* Lock-free probes (seqlock readers) against a writer that keeps inserting
 * and removing keys in crowded buckets, so backward shifts move the entries
 * the reader looks for: every answer that validates must be right. */
#include <pthread.h>
#include <stdatomic.h>

#define PERM 64
#define CHURN 512

struct race {
	struct kvs_index ix;
	struct rec r[PERM + CHURN];
	atomic_int stop;
	uint64_t validated, voided, wrong, raw_misses;
};

static void *churn(void *arg)
{
	struct race *t = arg;
	uint64_t x = 99;
	while (!atomic_load_explicit(&t->stop, memory_order_relaxed)) {
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		uint32_t i = PERM + (uint32_t)(x >> 33) % CHURN;
		if (t->r[i].present)
			kvs_index_remove(&t->ix, t->r[i].key, i);
		else
			kvs_index_insert(&t->ix, t->r[i].key, i);
		t->r[i].present ^= 1;
	}
	return NULL;
}

Test(kvstore_index, lock_free_probes_race_a_writer)
{
	static struct race t;
	memset(&t, 0, sizeof t);
	uint64_t x = 7;
	for (uint32_t i = 0; i < PERM + CHURN; i++) {
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		t.r[i].key = (kvs_key){(x >> 40) % 32 | (x & ~0xffffull), x};
	}
	cr_assert_eq(kvs_index_init(&t.ix, PERM + CHURN, t.r, sizeof t.r[0]), 0);
	/* Half the churn keys first, so the permanent ones sit behind them in
	 * the runs and move whenever a key before them goes. */
	for (uint32_t i = PERM; i < PERM + CHURN; i += 2)
		cr_assert_eq(kvs_index_insert(&t.ix, t.r[i].key, i), 0);
	for (uint32_t i = 0; i < PERM; i++)
		cr_assert_eq(kvs_index_insert(&t.ix, t.r[i].key, i), 0);
	for (uint32_t i = 0; i < PERM + CHURN; i++)
		t.r[i].present = i < PERM || i % 2 == 0;
	pthread_t w;
	cr_assert_eq(pthread_create(&w, NULL, churn, &t), 0);
	for (uint32_t it = 0; it < 1000000; it++) {
		uint32_t i = it % PERM;
		uint64_t v = kvs_index_read_begin(&t.ix);
		uint32_t got = kvs_index_probe(&t.ix, t.r[i].key);
		if (got != i)
			t.raw_misses++;
		if (kvs_index_read_ok(&t.ix, v)) {
			t.validated++;
			t.wrong += got != i;
		} else {
			t.voided++;
		}
	}
	atomic_store(&t.stop, 1);
	pthread_join(w, NULL);
	cr_log_info("validated=%llu voided=%llu raw_misses=%llu", (unsigned long long)t.validated,
		    (unsigned long long)t.voided, (unsigned long long)t.raw_misses);
	cr_assert_eq(t.wrong, 0, "%llu validated answers were wrong", (unsigned long long)t.wrong);
	cr_assert(t.validated > 0);
	kvs_index_fini(&t.ix);
}
