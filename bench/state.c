/* bench-state: what a snapshot of the coordinator's state store costs the
 * calls that run meanwhile. A store in a directory under /tmp is filled
 * with KVMESH_BENCH_RECORDS records of KVMESH_BENCH_VALUE bytes (default
 * 10,000 x 13.5 KB: 135 MB, 10,000 sequences of 500 blocks), then one thread
 * takes a snapshot while this one calls get + put (a control call's store
 * work) in a loop, timing each. The physical limit in the same run: the
 * same bytes written to a file in that filesystem and fsync'd.
 *
 * Final lines: state_snapshot_ms (the whole snapshot), state_raw_write_ms
 * (the limit), state_stall_worst_ms and state_stall_p99_ms (a get + put
 * while it ran; a snapshot written under the store's lock made the worst
 * as long as the snapshot). */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/bench_util.h"
#include "coordinator/state.h"

static kvm_state *st;
static volatile int snapshot_done;
static double snapshot_ms;

static void *snapshot_thread(void *arg)
{
	(void)arg;
	double t0 = now_s();
	if (kvm_state_snapshot(st) != 0)
		fprintf(stderr, "bench-state: the snapshot failed\n");
	snapshot_ms = (now_s() - t0) * 1e3;
	snapshot_done = 1;
	return NULL;
}

/* Writes bytes of value into a new file of dir and fsyncs it; ms. */
static double raw_write_ms(const char *dir, size_t records, const char *value, size_t len)
{
	char path[128];
	snprintf(path, sizeof(path), "%s/raw", dir);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0)
		return 0;
	double t0 = now_s();
	for (size_t i = 0; i < records; i++)
		if (write(fd, value, len) != (ssize_t)len)
			break;
	fsync(fd);
	double ms = (now_s() - t0) * 1e3;
	close(fd);
	unlink(path);
	return ms;
}

int main(void)
{
	size_t records = env_u64("KVMESH_BENCH_RECORDS", 10000);
	size_t len = env_u64("KVMESH_BENCH_VALUE", 13500);
	char dir[] = "/tmp/kvmesh-bench-state-XXXXXX";
	if (!mkdtemp(dir) || kvm_state_open_embedded(dir, 1ull << 40, &st) != 0) {
		fprintf(stderr, "bench-state: cannot open a store under /tmp\n");
		return 1;
	}
	char *value = malloc(len);
	memset(value, 7, len);
	char key[64];
	uint64_t ticket = 0;
	printf("bench-state: filling %zu records of %zu bytes...\n", records, len);
	fflush(stdout);
	for (size_t i = 0; i < records; i++) {
		snprintf(key, sizeof(key), "seqs/s%06zu", i);
		if (kvm_state_put_async(st, key, value, len, &ticket) != 0)
			return 1;
	}
	kvm_state_sync(st, ticket);
	double raw = raw_write_ms(dir, records, value, len);

	double *lat = malloc(sizeof(double) << 20);
	size_t n = 0;
	pthread_t t;
	pthread_create(&t, NULL, snapshot_thread, NULL);
	while (!snapshot_done && n < (1u << 20)) {
		double a = now_s();
		void *v;
		size_t vlen;
		if (kvm_state_get(st, "seqs/s000001", &v, &vlen) == 0)
			free(v);
		snprintf(key, sizeof(key), "probe/%zu", n % 100);
		kvm_state_put_async(st, key, "x", 1, &ticket);
		lat[n++] = (now_s() - a) * 1e3;
	}
	pthread_join(t, NULL);
	qsort(lat, n, sizeof(*lat), cmp_double);
	printf("bench-state: a %.0f MB table's snapshot took %.0f ms (writing its bytes "
	       "and fsync: %.0f ms); %zu get + put meanwhile: p50 %.3f, p99 %.3f, worst %.2f ms\n",
	       (double)records * (double)len / 1e6, snapshot_ms, raw, n, percentile(lat, n, 50),
	       percentile(lat, n, 99), n ? lat[n - 1] : 0.0);
	printf("state_snapshot_ms=%.1f\n", snapshot_ms);
	printf("state_raw_write_ms=%.1f\n", raw);
	printf("state_stall_p99_ms=%.3f\n", percentile(lat, n, 99));
	printf("state_stall_worst_ms=%.2f\n", n ? lat[n - 1] : 0.0);
	kvm_state_close(st);
	free(lat);
	free(value);
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	return system(cmd) == 0 ? 0 : 1;
}
