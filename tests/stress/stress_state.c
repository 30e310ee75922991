/* Group commit in the state store from several threads, as a plain program
 * so that it also runs under ThreadSanitizer: every acknowledged record is
 * there after a reopen, fsyncs are shared (fewer than the writes), and
 * snapshots written in the background meanwhile (every 16 KiB of log)
 * while values they read are replaced. Prints "N passed, N failed". */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coordinator/state.h"

enum { THREADS = 4, PUTS = 300 };

static kvm_state *st;

static void *writer(void *arg)
{
	uintptr_t id = (uintptr_t)arg;
	for (int pass = 0; pass < 2; pass++) /* the second replaces every value */
		for (int i = 0; i < PUTS; i++) {
			char key[64], val[32];
			snprintf(key, sizeof(key), "t%lu/%04d", (unsigned long)id, i);
			snprintf(val, sizeof(val), "%d", pass * 1000 + i);
			if (kvm_state_put(st, key, val, strlen(val)) != 0)
				return (void *)1;
		}
	return NULL;
}

int main(void)
{
	char dir[] = "/tmp/kvmesh-stress-state-XXXXXX";
	if (!mkdtemp(dir) || kvm_state_open_embedded(dir, 16 << 10, &st) != 0) {
		printf("stress_state: cannot open a store\n0 passed, 1 failed\n");
		return 1;
	}
	pthread_t t[THREADS];
	for (uintptr_t i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, writer, (void *)i);
	int passed = 0, failed = 0;
	for (int i = 0; i < THREADS; i++) {
		void *r;
		pthread_join(t[i], &r);
		r ? failed++ : passed++;
	}
	kvm_state_stats s;
	kvm_state_stats_get(st, &s);
	printf("%d puts, %llu fdatasyncs, %llu snapshots\n", 2 * THREADS * PUTS,
	       (unsigned long long)s.syncs, (unsigned long long)s.snapshots);
	if (s.syncs < 2ull * THREADS * PUTS)
		passed++;
	else
		failed++, printf("no fsync was shared\n");
	if (s.snapshots > 0 && s.snapshot_failures == 0)
		passed++;
	else
		failed++, printf("no snapshot in the background, or one failed\n");
	kvm_state_close(st);
	if (kvm_state_open_embedded(dir, 1 << 20, &st) != 0) {
		printf("reopen failed\n%d passed, %d failed\n", passed, failed + 1);
		return 1;
	}
	kvm_state_stats_get(st, &s);
	void *v;
	size_t len;
	bool last = kvm_state_get(st, "t3/0299", &v, &len) == 0 && len == 4 &&
		    memcmp(v, "1299", 4) == 0;
	if (last)
		free(v);
	if (s.records == (uint64_t)THREADS * PUTS && last)
		passed++;
	else
		failed++, printf("%llu records after reopen\n", (unsigned long long)s.records);
	kvm_state_close(st);
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd) != 0)
		failed++;
	printf("%d passed, %d failed\n", passed, failed);
	return failed != 0;
}
