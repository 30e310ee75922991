/* Concurrent slot alloc/free on one host arena from several threads, as a
 * plain program so that `make SAN=thread test` checks it (Criterion cannot
 * run under ThreadSanitizer). Each thread writes its id into the slots it
 * holds and checks them before freeing: a slot handed to two threads at
 * once, or a stale handle accepted, fails. Prints "N passed, N failed". */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "kvstore/arena.h"

enum { THREADS = 4, ROUNDS = 20000, HOLD = 8, SLOTS = 64, SLOT_BYTES = 256 };

static kvs_arena *arena;

static void *worker(void *arg)
{
	uintptr_t id = (uintptr_t)arg;
	kvs_handle held[HOLD];
	int n = 0, errors = 0;
	for (int r = 0; r < ROUNDS; r++) {
		if (n < HOLD && (r % 3 != 2 || n == 0)) {
			kvs_handle h;
			int rc = kvs_arena_alloc(arena, &h);
			if (rc == -ENOSPC)
				continue; /* the others hold everything for now */
			if (rc != 0) {
				errors++;
				continue;
			}
			uint8_t tag[SLOT_BYTES];
			memset(tag, (int)id, sizeof(tag));
			if (kvs_arena_write(arena, h, 0, tag, sizeof(tag)) != 0)
				errors++;
			held[n++] = h;
		} else {
			kvs_handle h = held[--n];
			uint8_t got[SLOT_BYTES];
			if (kvs_arena_read(arena, h, 0, got, sizeof(got)) != 0)
				errors++;
			for (int i = 0; i < SLOT_BYTES; i++)
				if (got[i] != (uint8_t)id) {
					errors++;
					break;
				}
			if (kvs_arena_free(arena, h) != 0)
				errors++;
			/* The freed handle is stale now, whoever got the slot. */
			if (kvs_arena_check(arena, h) != -ESTALE)
				errors++;
		}
	}
	while (n > 0)
		kvs_arena_free(arena, held[--n]);
	return (void *)(uintptr_t)errors;
}

int main(void)
{
	char err[256] = "";
	kvs_arena_opts o = {.slot_bytes = SLOT_BYTES, .n_slots = SLOTS, .err = err, .err_len = sizeof(err)};
	if (kvs_arena_create_host(&o, &arena) != 0) {
		printf("stress_kvstore: arena: %s\n0 passed, 1 failed\n", err);
		return 1;
	}
	pthread_t t[THREADS];
	for (uintptr_t i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, worker, (void *)(i + 1));
	int passed = 0, failed = 0;
	for (int i = 0; i < THREADS; i++) {
		void *errors;
		pthread_join(t[i], &errors);
		if (errors)
			failed++, printf("thread %d: %lu errors\n", i, (unsigned long)(uintptr_t)errors);
		else
			passed++;
	}
	if (kvs_arena_count_used(arena) != 0)
		failed++, printf("slots still used after all frees\n");
	kvs_arena_destroy(arena);
	printf("%d passed, %d failed\n", passed, failed);
	return failed != 0;
}
