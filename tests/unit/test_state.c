/* The embedded state store: records survive restarts, snapshots, torn
 * writes, a writer killed mid-stream and a full disk; bad input is refused. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coordinator/state.h"

static char dir[64];

static void make_dir(void)
{
	snprintf(dir, sizeof(dir), "/tmp/kvmesh-state-XXXXXX");
	cr_assert_not_null(mkdtemp(dir));
}

static void remove_dir(void)
{
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	cr_assert_eq(system(cmd), 0);
}

static char *get_str(kvm_state *st, const char *key)
{
	void *v;
	size_t len;
	if (kvm_state_get(st, key, &v, &len) != 0)
		return NULL;
	char *s = malloc(len + 1);
	memcpy(s, v, len);
	s[len] = '\0';
	free(v);
	return s;
}

static int collect(void *arg, const char *key, const void *val, size_t len)
{
	(void)val;
	(void)len;
	char *out = arg;
	strcat(out, key);
	strcat(out, ",");
	return 0;
}

Test(state, put_get_del_scan, .init = make_dir, .fini = remove_dir)
{
	kvm_state *st;
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	cr_assert_eq(kvm_state_put(st, "nodes/b", "B", 1), 0);
	cr_assert_eq(kvm_state_put(st, "nodes/a", "A", 1), 0);
	cr_assert_eq(kvm_state_put(st, "seqs/1", "S", 1), 0);
	cr_assert_eq(kvm_state_put(st, "nodes/a", "A2", 2), 0); /* overwrite */
	char *v = get_str(st, "nodes/a");
	cr_assert_str_eq(v, "A2");
	free(v);
	char keys[256] = "";
	cr_assert_eq(kvm_state_scan(st, "nodes/", collect, keys), 0);
	cr_assert_str_eq(keys, "nodes/a,nodes/b,");
	cr_assert_eq(kvm_state_del(st, "nodes/a"), 0);
	cr_assert_eq(kvm_state_del(st, "nodes/a"), -ENOENT);
	cr_assert_null(get_str(st, "nodes/a"));
	/* Bad input. */
	cr_assert_eq(kvm_state_put(st, "", "x", 1), -EINVAL);
	cr_assert_eq(kvm_state_put(st, "has space", "x", 1), -EINVAL);
	cr_assert_eq(kvm_state_put(st, NULL, "x", 1), -EINVAL);
	cr_assert_eq(kvm_state_put(st, "k", NULL, 3), -EINVAL);
	cr_assert_eq(kvm_state_put(st, "empty", NULL, 0), 0);
	v = get_str(st, "empty");
	cr_assert_str_eq(v, "");
	free(v);
	kvm_state_close(st);
}

Test(state, restart_and_snapshot_recover_everything, .init = make_dir, .fini = remove_dir)
{
	kvm_state *st;
	/* A tiny snapshot threshold: snapshots happen many times. */
	cr_assert_eq(kvm_state_open_embedded(dir, 4096, &st), 0);
	char key[32], val[64];
	for (int i = 0; i < 2000; i++) {
		snprintf(key, sizeof(key), "seqs/%05d", i % 700);
		snprintf(val, sizeof(val), "value-%d", i);
		cr_assert_eq(kvm_state_put(st, key, val, strlen(val)), 0);
		if (i % 7 == 3) {
			snprintf(key, sizeof(key), "seqs/%05d", (i * 13) % 700);
			kvm_state_del(st, key);
		}
	}
	kvm_state_stats s1;
	kvm_state_stats_get(st, &s1);
	cr_assert(s1.snapshots > 0);
	/* Record what is there, reopen, compare. */
	char *before = calloc(1, 1 << 16), *after = calloc(1, 1 << 16);
	kvm_state_scan(st, "", collect, before);
	kvm_state_close(st);
	cr_assert_eq(kvm_state_open_embedded(dir, 4096, &st), 0);
	kvm_state_scan(st, "", collect, after);
	cr_assert_str_eq(before, after);
	kvm_state_stats s2;
	kvm_state_stats_get(st, &s2);
	cr_assert_eq(s2.records, s1.records);
	cr_assert_eq(s2.torn_bytes, 0);
	/* Values too. */
	char *v = get_str(st, "seqs/00699");
	cr_assert_not_null(v);
	cr_assert(strncmp(v, "value-", 6) == 0);
	free(v);
	free(before);
	free(after);
	kvm_state_close(st);
}

Test(state, second_open_is_refused, .init = make_dir, .fini = remove_dir)
{
	kvm_state *a, *b;
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &a), 0);
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &b), -EBUSY);
	kvm_state_close(a);
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &b), 0);
	kvm_state_close(b);
}

Test(state, torn_tail_is_cut_and_writes_continue, .init = make_dir, .fini = remove_dir)
{
	kvm_state *st;
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	cr_assert_eq(kvm_state_put(st, "a", "1", 1), 0);
	cr_assert_eq(kvm_state_put(st, "b", "2", 1), 0);
	kvm_state_close(st);
	/* Half a record at the end, as a crash mid-write leaves. */
	char path[128];
	snprintf(path, sizeof(path), "%s/log", dir);
	int fd = open(path, O_WRONLY | O_APPEND);
	cr_assert(write(fd, "KVMR\x01\x02\x03", 7) == 7);
	close(fd);
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	kvm_state_stats s;
	kvm_state_stats_get(st, &s);
	cr_assert_eq(s.torn_bytes, 7);
	cr_assert_eq(s.records, 2);
	cr_assert_eq(kvm_state_put(st, "c", "3", 1), 0);
	kvm_state_close(st);
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	kvm_state_stats_get(st, &s);
	cr_assert_eq(s.records, 3);
	cr_assert_eq(s.torn_bytes, 0);
	kvm_state_close(st);
}

/* The log is preallocated with zeros: after a crash (here: its files
 * copied while the store is open) the zeros are no damage, and a record torn
 * inside them counts as torn alone. */
Test(state, preallocated_zeros_are_not_torn, .init = make_dir, .fini = remove_dir)
{
	kvm_state *st;
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	cr_assert_eq(kvm_state_put(st, "a", "1", 1), 0);
	cr_assert_eq(kvm_state_put(st, "b", "2", 1), 0);
	char cmd[256], log[128];
	snprintf(cmd, sizeof(cmd), "mkdir %s/c && cp %s/log %s/c/log", dir, dir, dir);
	cr_assert_eq(system(cmd), 0);
	kvm_state_close(st);
	snprintf(log, sizeof(log), "%s/c/log", dir);
	int fd = open(log, O_RDONLY);
	off_t size = lseek(fd, 0, SEEK_END);
	close(fd);
	cr_assert_gt(size, 1 << 20, "the log is preallocated: %lld bytes", (long long)size);

	char copy[128];
	snprintf(copy, sizeof(copy), "%s/c", dir);
	cr_assert_eq(kvm_state_open_embedded(copy, 0, &st), 0);
	kvm_state_stats s;
	kvm_state_stats_get(st, &s);
	cr_assert_eq(s.records, 2);
	cr_assert_eq(s.torn_bytes, 0);
	off_t end = (off_t)s.log_bytes;
	cr_assert_eq(kvm_state_put(st, "c", "3", 1), 0); /* goes over the zeros */
	kvm_state_close(st);
	/* A clean close trims the zeros. */
	fd = open(log, O_RDWR);
	off_t clean = lseek(fd, 0, SEEK_END);
	cr_assert_lt(clean, 4096);
	/* Half a record, then zeros, as a crash mid-write leaves it now. */
	static const char zeros[8192];
	cr_assert(pwrite(fd, zeros, sizeof(zeros), clean) == (ssize_t)sizeof(zeros));
	cr_assert(pwrite(fd, "KVMR\x01\x02\x03", 7, clean) == 7);
	close(fd);
	cr_assert_eq(kvm_state_open_embedded(copy, 0, &st), 0);
	kvm_state_stats_get(st, &s);
	cr_assert_eq(s.records, 3);
	cr_assert_eq(s.torn_bytes, 7);
	cr_assert_gt(clean, end);
	char *v = get_str(st, "c");
	cr_assert_str_eq(v, "3");
	free(v);
	kvm_state_close(st);
}

Test(state, damaged_snapshot_is_an_error, .init = make_dir, .fini = remove_dir)
{
	kvm_state *st;
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	cr_assert_eq(kvm_state_put(st, "a", "1", 1), 0);
	cr_assert_eq(kvm_state_snapshot(st), 0);
	kvm_state_close(st);
	char path[128];
	snprintf(path, sizeof(path), "%s/snapshot", dir);
	int fd = open(path, O_WRONLY);
	cr_assert(pwrite(fd, "X", 1, 21) == 1); /* flip a byte of the key */
	close(fd);
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), -EIO);
}

/* A child writes records and reports each one after put() returned; it is
 * killed at a random moment. Every acknowledged record must be there. */
Test(state, writer_killed_loses_nothing_acknowledged, .init = make_dir, .fini = remove_dir)
{
	for (int round = 0; round < 5; round++) {
		int p[2];
		cr_assert_eq(pipe(p), 0);
		pid_t pid = fork();
		if (pid == 0) {
			close(p[0]);
			kvm_state *st;
			if (kvm_state_open_embedded(dir, 8192, &st) != 0)
				_exit(2);
			for (int i = 0;; i++) {
				char key[32], val[32];
				snprintf(key, sizeof(key), "r%d/%06d", round, i);
				snprintf(val, sizeof(val), "%d", i);
				if (kvm_state_put(st, key, val, strlen(val)) != 0)
					_exit(3);
				if (write(p[1], &i, sizeof(i)) != sizeof(i))
					_exit(4);
			}
		}
		close(p[1]);
		usleep(20000 + (unsigned)(rand() % 50000));
		kill(pid, SIGKILL);
		int acked = -1, i;
		while (read(p[0], &i, sizeof(i)) == sizeof(i))
			acked = i;
		close(p[0]);
		waitpid(pid, NULL, 0);
		cr_assert(acked >= 0, "child acknowledged nothing");
		kvm_state *st;
		cr_assert_eq(kvm_state_open_embedded(dir, 8192, &st), 0);
		for (int j = 0; j <= acked; j++) {
			char key[32], want[32];
			snprintf(key, sizeof(key), "r%d/%06d", round, j);
			snprintf(want, sizeof(want), "%d", j);
			char *v = get_str(st, key);
			cr_assert_not_null(v, "round %d: acknowledged record %s lost (acked %d)", round,
					   key, acked);
			cr_assert_str_eq(v, want);
			free(v);
		}
		kvm_state_close(st);
	}
}

/* Records written from several threads across many preallocated chunks
 * (the preallocator extending ahead of them) and an automatic snapshot all
 * come back after a reopen, and a clean close leaves no zeros behind. */
typedef struct writer_arg {
	kvm_state *st;
	int id;
} writer_arg;

static void *write_many(void *arg)
{
	writer_arg *w = arg;
	char val[3000];
	memset(val, 'a' + w->id, sizeof(val));
	for (int i = 0; i < 2000; i++) {
		char key[64];
		snprintf(key, sizeof(key), "w%d/%05d", w->id, i);
		uint64_t t;
		cr_assert_eq(kvm_state_put_async(w->st, key, val, sizeof(val), &t), 0);
		if (i % 7 == 0) /* some wait, as acknowledged calls do */
			cr_assert_eq(kvm_state_sync(w->st, t), 0);
	}
	return NULL;
}

Test(state, records_across_preallocated_chunks_survive_reopen, .init = make_dir,
     .fini = remove_dir)
{
	kvm_state *st;
	/* 4 x 2000 x ~3 KiB = ~24 MiB of log: six 4 MiB chunks; a snapshot at 16 MiB. */
	cr_assert_eq(kvm_state_open_embedded(dir, 16u << 20, &st), 0);
	pthread_t t[4];
	writer_arg w[4];
	for (int i = 0; i < 4; i++) {
		w[i] = (writer_arg){st, i};
		pthread_create(&t[i], NULL, write_many, &w[i]);
	}
	for (int i = 0; i < 4; i++)
		pthread_join(t[i], NULL);
	kvm_state_stats s;
	kvm_state_stats_get(st, &s);
	cr_assert_geq(s.snapshots, 1, "a snapshot while the preallocator ran");
	cr_assert_eq(s.records, 8000);
	kvm_state_close(st);

	char path[128];
	snprintf(path, sizeof(path), "%s/log", dir);
	int fd = open(path, O_RDONLY);
	cr_assert_geq(fd, 0);
	off_t size = lseek(fd, 0, SEEK_END);
	char last = 1;
	if (size > 0)
		cr_assert_eq(pread(fd, &last, 1, size - 1), 1);
	close(fd);
	cr_assert(size == 0 || last != 0, "a clean close trims the preallocated zeros");

	cr_assert_eq(kvm_state_open_embedded(dir, 16u << 20, &st), 0);
	kvm_state_stats_get(st, &s);
	cr_assert_eq(s.records, 8000);
	cr_assert_eq(s.torn_bytes, 0);
	for (int id = 0; id < 4; id++)
		for (int i = 0; i < 2000; i += 333) {
			char key[64];
			snprintf(key, sizeof(key), "w%d/%05d", id, i);
			void *v;
			size_t len;
			cr_assert_eq(kvm_state_get(st, key, &v, &len), 0, "%s", key);
			cr_assert_eq(len, 3000);
			cr_assert_eq(((char *)v)[0], 'a' + id);
			cr_assert_eq(((char *)v)[2999], 'a' + id);
			free(v);
		}
	kvm_state_close(st);
}

/* ---- A full disk (simulated with the file-size limit: writes past it fail
 * with EFBIG, as they fail with ENOSPC on a full disk; the hard limit stays,
 * so the test can lift it again). ---- */

static void limit_file_size(rlim_t bytes)
{
	signal(SIGXFSZ, SIG_IGN); /* the write fails instead of killing us */
	struct rlimit r;
	cr_assert_eq(getrlimit(RLIMIT_FSIZE, &r), 0);
	cr_assert(bytes == RLIM_INFINITY || r.rlim_max == RLIM_INFINITY || r.rlim_max >= bytes);
	r.rlim_cur = bytes;
	cr_assert_eq(setrlimit(RLIMIT_FSIZE, &r), 0);
}

static void value_for(char *v, size_t len, int i)
{
	memset(v, 'a' + i % 26, len);
	snprintf(v, len, "%d", i);
}

/* Checks that key holds value_for(i). */
static void assert_value(kvm_state *st, const char *key, size_t len, int i)
{
	char want[16384];
	value_for(want, len, i);
	void *v;
	size_t got;
	cr_assert_eq(kvm_state_get(st, key, &v, &got), 0, "%s is there", key);
	cr_assert(got == len && memcmp(v, want, len) == 0, "%s holds what was acknowledged", key);
	free(v);
}

Test(state, full_disk_refuses_new_state_keeps_deletes_and_recovers, .init = make_dir,
     .fini = remove_dir)
{
	enum { VAL = 4096 };
	limit_file_size(4u << 20); /* the first 4 MiB of zeros, and no more */
	kvm_state *st;
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	char key[64], val[VAL];
	int acked = 0, rc = 0;
	while (rc == 0 && acked < 2000) {
		snprintf(key, sizeof(key), "k/%05d", acked);
		value_for(val, VAL, acked);
		if ((rc = kvm_state_put(st, key, val, VAL)) == 0)
			acked++;
	}
	cr_assert_eq(rc, -EFBIG, "refused for want of room, not %s", strerror(-rc));
	kvm_state_stats s;
	kvm_state_stats_get(st, &s);
	cr_assert_eq(s.room_error, -EFBIG);
	cr_assert_eq(s.refused, 1);
	cr_assert_eq(s.sync_error, 0, "a refusal is not a failure");
	cr_assert_geq(s.room_bytes, 1u << 20, "1 MiB kept for deletes and upkeep");
	cr_assert_geq((size_t)acked * VAL, 2u << 20, "ordinary puts until the reserve");

	/* Refused: nothing changed. */
	cr_assert_eq(kvm_state_get(st, key, &(void *){0}, &(size_t){0}), -ENOENT);
	value_for(val, VAL, 9999);
	cr_assert_eq(kvm_state_put(st, "k/00000", val, VAL), -EFBIG);
	assert_value(st, "k/00000", VAL, 0);
	/* Deletes and upkeep go on. */
	for (int i = 0; i < 10; i++) {
		snprintf(key, sizeof(key), "k/%05d", i);
		cr_assert_eq(kvm_state_del(st, key), 0);
	}
	cr_assert_eq(kvm_state_upkeep(st, "nodes/n1", "up", 2), 0);
	cr_assert_eq(kvm_state_failed(st), 0);

	/* Space again: the log grows again within about a second. */
	limit_file_size(RLIM_INFINITY);
	value_for(val, VAL, acked);
	snprintf(key, sizeof(key), "k/%05d", acked);
	for (int tries = 0; (rc = kvm_state_put(st, key, val, VAL)) != 0 && tries < 40; tries++)
		usleep(100000);
	cr_assert_eq(rc, 0, "puts taken again once the log can grow");
	acked++;
	kvm_state_stats_get(st, &s);
	cr_assert_eq(s.room_error, 0);
	kvm_state_close(st);

	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	kvm_state_stats_get(st, &s);
	cr_assert_eq(s.records, (uint64_t)acked - 10 + 1, "acknowledged puts, less deletes");
	for (int i = 0; i < acked; i++) {
		snprintf(key, sizeof(key), "k/%05d", i);
		if (i < 10)
			cr_assert_eq(kvm_state_get(st, key, &(void *){0}, &(size_t){0}), -ENOENT);
		else
			assert_value(st, key, VAL, i);
	}
	snprintf(key, sizeof(key), "k/%05d", acked);
	cr_assert_eq(kvm_state_get(st, key, &(void *){0}, &(size_t){0}), -ENOENT);
	char *up = get_str(st, "nodes/n1");
	cr_assert_str_eq(up, "up");
	free(up);
	kvm_state_close(st);
}

Test(state, failing_snapshots_leave_the_appends_in_the_log, .init = make_dir, .fini = remove_dir)
{
	enum { VAL = 16384, N = 300 }; /* ~4.8 MiB of table: past the limit */
	limit_file_size((4u << 20) + (256u << 10)); /* a log's first zeros fit */
	kvm_state *st;
	cr_assert_eq(kvm_state_open_embedded(dir, 256u << 10, &st), 0);
	char key[64], val[VAL];
	for (int i = 0; i < N; i++) {
		snprintf(key, sizeof(key), "k/%05d", i);
		value_for(val, VAL, i);
		int prc = kvm_state_put(st, key, val, VAL);
		cr_assert_eq(prc, 0, "put %d: %s", i, strerror(-prc));
	}
	/* Those in the background may still run: one more, waited for. */
	cr_assert_eq(kvm_state_snapshot(st), -EFBIG, "the table no longer fits in a file");
	kvm_state_stats s;
	kvm_state_stats_get(st, &s);
	cr_assert_geq(s.snapshots, 1, "snapshots while the table fitted");
	cr_assert_eq(s.sync_error, 0);
	char tmp[128];
	snprintf(tmp, sizeof(tmp), "%s/snapshot.tmp", dir);
	cr_assert_neq(access(tmp, F_OK), 0, "a failed snapshot leaves no file behind");
	limit_file_size(RLIM_INFINITY);
	kvm_state_close(st);

	cr_assert_eq(kvm_state_open_embedded(dir, 256u << 10, &st), 0);
	kvm_state_stats_get(st, &s);
	cr_assert_eq(s.records, N);
	for (int i = 0; i < N; i++) {
		snprintf(key, sizeof(key), "k/%05d", i);
		assert_value(st, key, VAL, i);
	}
	kvm_state_close(st);
}

Test(state, a_failed_write_sticks_and_loses_nothing_acknowledged, .init = make_dir,
     .fini = remove_dir)
{
	/* Room for the first zeros and more: the preallocator never fails. */
	limit_file_size((8u << 20) + (64u << 10));
	kvm_state *st;
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	cr_assert_eq(kvm_state_put(st, "a", "1", 1), 0);
	kvm_state_stats s;
	kvm_state_stats_get(st, &s);
	cr_assert_eq(s.room_error, 0);
	/* Past the zeros written ahead: the syncer extends the log itself, and
	 * that write fails after the record was applied. */
	size_t big = 10u << 20;
	char *v = malloc(big);
	memset(v, 'x', big);
	cr_assert_eq(kvm_state_put(st, "big", v, big), -EFBIG);
	free(v);
	cr_assert_eq(kvm_state_failed(st), -EFBIG);
	cr_assert_eq(kvm_state_put(st, "b", "2", 1), -EFBIG, "every later sync fails too");
	limit_file_size(RLIM_INFINITY);
	cr_assert_eq(kvm_state_put(st, "c", "3", 1), -EFBIG, "until the store is opened again");
	kvm_state_close(st);

	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	char *a = get_str(st, "a");
	cr_assert_str_eq(a, "1");
	free(a);
	cr_assert_null(get_str(st, "big"));
	cr_assert_null(get_str(st, "b"));
	cr_assert_eq(kvm_state_put(st, "d", "4", 1), 0, "the reopened store takes writes");
	kvm_state_close(st);
}

/* ---- Snapshots written in the background: the active log is sealed as
 * "log.GEN" and a thread writes the table; a crash at any point replays
 * the right files. ---- */

static void *overwrite_many(void *arg)
{
	kvm_state *st = arg;
	char key[32], val[64];
	for (int round = 0; round < 3; round++)
		for (int i = 0; i < 2000; i++) {
			snprintf(key, sizeof(key), "k/%05d", i);
			snprintf(val, sizeof(val), "round %d of %d", round, i);
			if (round && i % 10 == 9) /* put in round 0, deleted in round 1 */
				cr_assert_eq(kvm_state_del(st, key), round == 1 ? 0 : -ENOENT);
			else
				cr_assert_eq(kvm_state_put(st, key, val, strlen(val)), 0);
		}
	return NULL;
}

Test(state, changes_during_background_snapshots_survive_reopen, .init = make_dir,
     .fini = remove_dir)
{
	kvm_state *st;
	/* Snapshots every 64 KiB of log, while the table's values and keys are
	 * replaced and deleted under them (ASan checks what they read). */
	cr_assert_eq(kvm_state_open_embedded(dir, 64u << 10, &st), 0);
	char big[4096];
	memset(big, 'b', sizeof(big));
	for (int i = 0; i < 300; i++) { /* a table that takes a while to write */
		char key[32];
		snprintf(key, sizeof(key), "big/%03d", i);
		cr_assert_eq(kvm_state_put(st, key, big, sizeof(big)), 0);
	}
	pthread_t t;
	pthread_create(&t, NULL, overwrite_many, st);
	for (int i = 0; i < 5; i++)
		cr_assert_eq(kvm_state_snapshot(st), 0);
	pthread_join(t, NULL);
	kvm_state_stats s;
	kvm_state_stats_get(st, &s);
	cr_assert_geq(s.snapshots, 5);
	kvm_state_close(st);

	cr_assert_eq(kvm_state_open_embedded(dir, 64u << 10, &st), 0);
	kvm_state_stats_get(st, &s);
	cr_assert_eq(s.records, 300 + 1800, "300 big, 2000 less 200 deleted");
	for (int i = 0; i < 2000; i++) {
		char key[32], want[64];
		snprintf(key, sizeof(key), "k/%05d", i);
		char *v = get_str(st, key);
		if (i % 10 == 9) {
			cr_assert_null(v, "%s was deleted", key);
		} else {
			snprintf(want, sizeof(want), "round 2 of %d", i);
			cr_assert_str_eq(v, want);
		}
		free(v);
	}
	kvm_state_close(st);
}

static void copy_file(const char *from, const char *to)
{
	char cmd[512];
	snprintf(cmd, sizeof(cmd), "cp %s %s", from, to);
	cr_assert_eq(system(cmd), 0);
}

Test(state, a_crash_inside_a_snapshot_replays_the_right_logs, .init = make_dir,
     .fini = remove_dir)
{
	char log[128], saved[128], sealed[128];
	snprintf(log, sizeof(log), "%s/log", dir);
	snprintf(saved, sizeof(saved), "%s.saved", dir);
	snprintf(sealed, sizeof(sealed), "%s/log.0", dir);
	kvm_state *st;

	/* Crash before the snapshot was renamed into place: the sealed log
	 * and then the active one hold everything, in order. */
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	cr_assert_eq(kvm_state_put(st, "a", "old", 3), 0);
	cr_assert_eq(kvm_state_put(st, "b", "1", 1), 0);
	kvm_state_close(st);
	copy_file(log, saved);
	cr_assert_eq(rename(log, sealed), 0); /* as a snapshot's start leaves it */
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	cr_assert_eq(kvm_state_put(st, "a", "new", 3), 0);
	kvm_state_close(st);
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	char *a = get_str(st, "a"), *b = get_str(st, "b");
	cr_assert_str_eq(a, "new");
	cr_assert_str_eq(b, "1");
	free(a);
	free(b);

	/* Crash after the snapshot was in place, before the sealed logs it
	 * covers were deleted: they are skipped (and deleted), not replayed
	 * over it. */
	cr_assert_eq(kvm_state_snapshot(st), 0);
	kvm_state_close(st);
	cr_assert_neq(access(sealed, F_OK), 0, "the snapshot deleted what it covers");
	copy_file(saved, sealed); /* "a" = "old" in a log the snapshot covers */
	cr_assert_eq(kvm_state_open_embedded(dir, 0, &st), 0);
	a = get_str(st, "a");
	cr_assert_str_eq(a, "new");
	free(a);
	cr_assert_neq(access(sealed, F_OK), 0, "a covered log is deleted at open");
	kvm_state_close(st);
	unlink(saved);
}
