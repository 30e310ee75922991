/* The embedded state store: an in-memory sorted table of records, made
 * durable by an append-only log (fdatasync'd before a write returns) and
 * compacted into a snapshot once the log grows past a threshold.
 *
 * On-disk record (log and snapshot alike), little-endian:
 *   magic u32 "KVMR" | xxh32 u32 of everything after it | op u8 | pad 3 |
 *   key length u32 | value length u32 | key | value
 * Snapshot, once the log grows past a threshold: under the lock, the active
 * "log" (all of it synced) is renamed "log.GEN" (sealed), a new "log" is
 * created (directory fsync'd) and the table's record pointers are copied;
 * then a thread writes the table to snapshot.tmp, fsyncs it, renames it over
 * "snapshot" (whose first record, GEN_KEY, says which logs it covers),
 * fsyncs the directory and deletes those sealed logs. Meanwhile changes go
 * on into the new log; the values and keys the table drops are freed once
 * the snapshot ends. At open: the snapshot, then the sealed logs it does not
 * cover (a crash before its rename), oldest first, then "log"; sealed logs
 * it covers (a crash before their deletion) are deleted unread.
 *
 * The log is preallocated: zeros are written (and synced) ahead of the
 * records, LOG_CHUNK at a time, and records overwrite them in place. An
 * fdatasync of an append that grows the file must also commit the inode's
 * new size to the journal; an overwrite inside the file's size need not,
 * which halves its latency on ext4 (bench-control measures both). A thread
 * of the store's own extends the zeros while the records are still
 * LOG_CHUNK / 2 away from their end, in small written-back pieces, so that
 * no commit waits for a chunk of zeros (one that did took 5-7 ms, ten times
 * a commit, each time the log crossed a chunk). At open, a tail of zeros
 * after the last record is that preallocation, not damage; a clean close
 * trims it.
 *
 * A full disk: when the preallocation fails, records must fit in the zeros
 * already written, so a put or delete that would not is refused before it
 * changes anything (and the preallocation is tried again, at most once a
 * second). Ordinary puts are refused while less than LOG_RESERVE is left,
 * which keeps deletes and upkeep puts going. A write or sync that fails
 * after records were applied is sticky: what is durable is unknown from
 * there on, and every later sync returns that error (the coordinator stops
 * and restarts from the disk). A snapshot that fails is tried again later
 * (its sealed logs stay until one succeeds); none is tried while the disk
 * is full. */
#include "coordinator/state.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/log.h"

#define REC_MAGIC 0x524d564bu /* "KVMR" */
#define REC_HEADER 20
#define LOG_CHUNK (4u << 20)  /* preallocated ahead of the records */
#define ZERO_PIECE (128u << 10) /* written back at a time by the preallocator */
#define LOG_RESERVE (1u << 20) /* kept for deletes and upkeep once the log cannot grow */
#define ROOM_RETRY_NS 1000000000u /* between tries to extend a log that could not grow */
enum { OP_PUT = 1, OP_DEL = 2 };
#define GEN_KEY "~log-generation" /* a snapshot's first record: the logs it covers */

typedef struct record {
	char *key;
	void *val;
	size_t len;
} record;

struct kvm_state {
	pthread_mutex_t mu;
	char *dir;
	int lock_fd, log_fd;
	off_t log_end;   /* where the next record goes (the syncer's, or under mu) */
	off_t log_alloc; /* the file's size: zeros from log_end to here */
	record *recs; /* sorted by key */
	size_t n, cap;
	uint64_t snapshot_bytes;
	kvm_state_stats stats;
	/* Group commit: records are numbered as appended and kept in `pending`
	 * until a syncer writes them out and fdatasyncs, outside the lock, so an
	 * append never waits for the disk. `synced` is durable. */
	uint64_t appended, synced;
	uint8_t *pending;
	size_t pending_len, pending_cap;
	bool syncing;
	size_t syncing_len; /* bytes the syncer is writing from log_end */
	int sync_error;
	pthread_cond_t synced_cv;
	uint64_t sync_ns; /* a sync's time, moving average */
	/* The preallocator thread. Whoever extends the zeros (it, or a syncer
	 * that found none left) first sets alloc_busy: log_alloc is then its
	 * alone until it clears it and signals alloc_cv. */
	pthread_t prealloc;
	bool prealloc_running, prealloc_wanted, prealloc_stop, alloc_busy;
	pthread_cond_t alloc_cv;
	/* Why the log could not grow (0: it can), and when the preallocator may
	 * try again (monotonic ns). */
	int room_error;
	uint64_t room_retry_ns;
	uint64_t snapshot_retry_bytes; /* after a failed snapshot: try at this log size */
	/* The active log is "log", generation log_gen; older ones, sealed at
	 * a snapshot's start, are "log.GEN" until a snapshot covers them. */
	uint64_t log_gen;
	/* A snapshot being written by its thread, without the lock, from a
	 * copy of the table's pointers (snap_recs): what the table drops
	 * meanwhile waits in `graveyard` until it ends. */
	bool snap_running, snap_thread_joinable;
	pthread_t snap_thread;
	pthread_cond_t snap_cv;
	record *snap_recs;
	size_t snap_n;
	uint64_t snap_gen; /* it covers the logs up to this generation */
	int snap_rc;
	uint64_t snap_done; /* snapshots ended (either way), for waiters */
	void **graveyard;
	size_t grave_n, grave_cap;
};

static uint64_t mono_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* ---- The sorted table ------------------------------------------------------------ */

/* Index of key, or of where it would go (*found says which). */
static size_t find(const kvm_state *st, const char *key, bool *found)
{
	size_t lo = 0, hi = st->n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = strcmp(st->recs[mid].key, key);
		if (c == 0) {
			*found = true;
			return mid;
		}
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	*found = false;
	return lo;
}

/* Room in the graveyard for two more (a key and a value), while a snapshot
 * reads the table's memory. */
static int grave_room(kvm_state *st)
{
	if (!st->snap_running || st->grave_n + 2 <= st->grave_cap)
		return 0;
	size_t cap = st->grave_cap ? st->grave_cap * 2 : 64;
	void **g = realloc(st->graveyard, cap * sizeof(*g));
	if (!g)
		return -ENOMEM;
	st->graveyard = g;
	st->grave_cap = cap;
	return 0;
}

/* Frees p now, or once the snapshot that may be reading it ends. */
static void discard(kvm_state *st, void *p)
{
	if (st->snap_running)
		st->graveyard[st->grave_n++] = p; /* grave_room made room */
	else
		free(p);
}

static int table_put(kvm_state *st, const char *key, const void *val, size_t len)
{
	if (grave_room(st) != 0)
		return -ENOMEM;
	void *copy = malloc(len ? len : 1);
	if (!copy)
		return -ENOMEM;
	memcpy(copy, val, len);
	bool found;
	size_t i = find(st, key, &found);
	if (found) {
		discard(st, st->recs[i].val);
		st->recs[i].val = copy;
		st->recs[i].len = len;
		return 0;
	}
	if (st->n == st->cap) {
		size_t cap = st->cap ? st->cap * 2 : 64;
		record *r = realloc(st->recs, cap * sizeof(record));
		if (!r) {
			free(copy);
			return -ENOMEM;
		}
		st->recs = r;
		st->cap = cap;
	}
	char *k = strdup(key);
	if (!k) {
		free(copy);
		return -ENOMEM;
	}
	memmove(&st->recs[i + 1], &st->recs[i], (st->n - i) * sizeof(record));
	st->recs[i] = (record){.key = k, .val = copy, .len = len};
	st->n++;
	return 0;
}

static int table_del(kvm_state *st, const char *key)
{
	bool found;
	size_t i = find(st, key, &found);
	if (!found)
		return -ENOENT;
	if (grave_room(st) != 0)
		return -ENOMEM;
	discard(st, st->recs[i].key);
	discard(st, st->recs[i].val);
	memmove(&st->recs[i], &st->recs[i + 1], (st->n - i - 1) * sizeof(record));
	st->n--;
	return 0;
}

/* ---- Records on disk -------------------------------------------------------------- */

static void put_u32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}
static uint32_t get_u32(const uint8_t *p)
{
	return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Encodes one record into a malloc'd buffer. */
static uint8_t *encode(int op, const char *key, const void *val, size_t len, size_t *out_len)
{
	size_t klen = strlen(key), total = REC_HEADER + klen + len;
	uint8_t *b = malloc(total);
	if (!b)
		return NULL;
	put_u32(b, REC_MAGIC);
	b[8] = (uint8_t)op, b[9] = b[10] = b[11] = 0;
	put_u32(b + 12, (uint32_t)klen);
	put_u32(b + 16, (uint32_t)len);
	memcpy(b + REC_HEADER, key, klen);
	if (len)
		memcpy(b + REC_HEADER + klen, val, len);
	put_u32(b + 4, XXH32(b + 8, total - 8, 0));
	*out_len = total;
	return b;
}

static int pwrite_all(int fd, const uint8_t *p, size_t n, off_t off)
{
	while (n > 0) {
		ssize_t w = pwrite(fd, p, n, off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += w;
		n -= (size_t)w;
		off += w;
	}
	return 0;
}

/* Writes zeros over [from, to), so that the records written there later
 * overwrite the file instead of growing it. With write_back, each piece is
 * written to the disk at once (a later fdatasync of records then flushes
 * little of it); the caller's fdatasync makes them durable. *reached: how
 * far they were written (to, unless it failed). */
static int write_zeros(int fd, off_t from, off_t to, bool write_back, off_t *reached)
{
	static const uint8_t zeros[ZERO_PIECE];
	*reached = from;
	for (off_t off = from; off < to;) {
		size_t n = (size_t)(to - off) < sizeof(zeros) ? (size_t)(to - off) : sizeof(zeros);
		int rc = pwrite_all(fd, zeros, n, off);
		if (rc != 0)
			return rc;
		if (write_back) /* best effort: the fdatasync after makes them durable */
			(void)sync_file_range(fd, off, (off_t)n,
					      SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
						      SYNC_FILE_RANGE_WAIT_AFTER);
		off += (off_t)n;
		*reached = off;
	}
	return 0;
}

/* Takes the right to extend the zeros (waiting for whoever has it); mu held. */
static void claim_alloc(kvm_state *st)
{
	while (st->alloc_busy)
		pthread_cond_wait(&st->alloc_cv, &st->mu);
	st->alloc_busy = true;
}

static void release_alloc(kvm_state *st)
{
	st->alloc_busy = false;
	pthread_cond_broadcast(&st->alloc_cv);
}

/* Wakes the preallocator when the zeros ahead run short (after a failure,
 * once ROOM_RETRY_NS has passed); mu held. */
static void want_zeros(kvm_state *st)
{
	if (st->prealloc_running && !st->alloc_busy &&
	    st->log_alloc - st->log_end < (off_t)LOG_CHUNK / 2 &&
	    (!st->room_error || mono_ns() >= st->room_retry_ns)) {
		st->prealloc_wanted = true;
		pthread_cond_broadcast(&st->alloc_cv);
	}
}

/* Zeros left for records not yet written; mu held. */
static off_t room_left(const kvm_state *st)
{
	return st->log_alloc - st->log_end - (off_t)st->syncing_len - (off_t)st->pending_len;
}

/* Whether a record of n bytes may be appended: always while the log can
 * grow; once it cannot, only into the zeros already written, and an
 * ordinary put only while LOG_RESERVE of them stay free. mu held. */
static int check_room(kvm_state *st, size_t n, bool reserve)
{
	if (!st->room_error || !st->prealloc_running) /* without it, syncers extend */
		return 0;
	if (room_left(st) >= (off_t)n + (reserve ? 0 : (off_t)LOG_RESERVE))
		return 0;
	st->stats.refused++;
	want_zeros(st); /* perhaps there is room again */
	return st->room_error;
}

/* After zeros were written up to reached (rc: how that went): the room
 * grows, and a failure stops ordinary puts short of the reserve, until a
 * later try succeeds. mu held, alloc claimed. */
static void zeros_written(kvm_state *st, off_t reached, int rc)
{
	if (reached > st->log_alloc)
		st->log_alloc = reached;
	if (rc == 0) {
		if (st->room_error)
			kvm_log(KVM_LOG_INFO, "state_log_can_grow", "dir=%s", st->dir);
		st->room_error = 0;
		return;
	}
	if (!st->room_error)
		kvm_log(KVM_LOG_ERROR, "state_log_cannot_grow",
			"dir=%s error=\"%s\" room_bytes=%lld "
			"effect=\"new state refused once %u KiB are left; deletes go on\"",
			st->dir, strerror(-rc), (long long)(room_left(st) > 0 ? room_left(st) : 0),
			LOG_RESERVE >> 10);
	st->room_error = rc;
	st->room_retry_ns = mono_ns() + ROOM_RETRY_NS;
}

static void *prealloc_main(void *arg)
{
	kvm_state *st = arg;
	pthread_mutex_lock(&st->mu);
	for (;;) {
		while (!st->prealloc_wanted && !st->prealloc_stop)
			pthread_cond_wait(&st->alloc_cv, &st->mu);
		if (st->prealloc_stop)
			break;
		st->prealloc_wanted = false;
		claim_alloc(st);
		if (st->log_alloc - st->log_end >= (off_t)LOG_CHUNK / 2) {
			release_alloc(st); /* a syncer extended them meanwhile */
			continue;
		}
		off_t from = st->log_alloc;
		pthread_mutex_unlock(&st->mu);
		off_t reached;
		int rc = write_zeros(st->log_fd, from, from + LOG_CHUNK, true, &reached);
		if (rc == 0 && fdatasync(st->log_fd) != 0)
			rc = -errno; /* then the next records' sync fails, and sticks */
		pthread_mutex_lock(&st->mu);
		zeros_written(st, reached, rc);
		release_alloc(st);
	}
	pthread_mutex_unlock(&st->mu);
	return NULL;
}

/* Reads a whole file into memory (empty if it does not exist). */
static int read_file(const char *path, uint8_t **out, size_t *len)
{
	*out = NULL;
	*len = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : -errno;
	struct stat sb;
	if (fstat(fd, &sb) != 0) {
		close(fd);
		return -errno;
	}
	uint8_t *b = malloc((size_t)sb.st_size + 1);
	if (!b) {
		close(fd);
		return -ENOMEM;
	}
	size_t got = 0;
	while (got < (size_t)sb.st_size) {
		ssize_t r = read(fd, b + got, (size_t)sb.st_size - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		got += (size_t)r;
	}
	close(fd);
	*out = b;
	*len = got;
	return 0;
}

/* Applies records from buf; returns how many bytes held valid records. A
 * snapshot's generation record sets *covered and *has_gen. */
static size_t replay(kvm_state *st, const uint8_t *buf, size_t len, int *rc, uint64_t *covered,
		     bool *has_gen)
{
	size_t off = 0;
	*rc = 0;
	while (len - off >= REC_HEADER) {
		const uint8_t *r = buf + off;
		uint32_t klen = get_u32(r + 12), vlen = get_u32(r + 16);
		if (get_u32(r) != REC_MAGIC || klen == 0 || klen >= KVM_STATE_MAX_KEY ||
		    vlen > KVM_STATE_MAX_VALUE || len - off - REC_HEADER < (size_t)klen + vlen)
			break;
		size_t total = REC_HEADER + klen + vlen;
		if (XXH32(r + 8, total - 8, 0) != get_u32(r + 4) || (r[8] != OP_PUT && r[8] != OP_DEL))
			break;
		char key[KVM_STATE_MAX_KEY];
		memcpy(key, r + REC_HEADER, klen);
		key[klen] = '\0';
		if (strcmp(key, GEN_KEY) == 0) { /* a snapshot's: not a record of the table */
			char g[32];
			snprintf(g, sizeof(g), "%.*s", (int)(vlen < 31 ? vlen : 31),
				 (const char *)r + REC_HEADER + klen);
			*covered = strtoull(g, NULL, 10);
			*has_gen = true;
			off += total;
			continue;
		}
		if (r[8] == OP_PUT)
			*rc = table_put(st, key, r + REC_HEADER + klen, vlen);
		else
			table_del(st, key); /* absent is fine: replays are idempotent */
		if (*rc != 0)
			break;
		st->stats.recovered++;
		off += total;
	}
	return off;
}

static void path_in(const kvm_state *st, const char *name, char *buf, size_t cap)
{
	snprintf(buf, cap, "%s/%s", st->dir, name);
}

static int fsync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	int rc = fsync(fd) == 0 ? 0 : -errno;
	close(fd);
	return rc;
}

/* ---- Snapshot --------------------------------------------------------------------- */

#define SNAP_BUF (1u << 20)       /* written at a time */

/* "log.GEN" names a sealed log: its generation in *gen. */
static bool sealed_log_gen(const char *name, uint64_t *gen)
{
	if (strncmp(name, "log.", 4) != 0 || !name[4])
		return false;
	char *end;
	errno = 0;
	unsigned long long g = strtoull(name + 4, &end, 10);
	if (*end || errno || name[4] < '0' || name[4] > '9')
		return false;
	*gen = g;
	return true;
}

/* Deletes the sealed logs a snapshot covering generation gen made useless. */
static void remove_sealed_logs(const char *dir, uint64_t gen)
{
	DIR *d = opendir(dir);
	if (!d)
		return;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		uint64_t g;
		if (sealed_log_gen(e->d_name, &g) && g <= gen) {
			char path[4096];
			snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
			unlink(path);
		}
	}
	closedir(d);
	(void)fsync_dir(dir); /* best effort: a sealed log left over is skipped at open */
}

/* Writes recs[0..n) as the snapshot covering the logs up to generation gen:
 * snapshot.tmp, fsync'd, renamed over "snapshot", the directory fsync'd;
 * then deletes those logs. Runs without the lock: recs and what they point
 * to stay until end_snapshot. */
static int write_snapshot(const char *dir, const record *recs, size_t n, uint64_t gen)
{
	char tmp[4096], final[4096];
	snprintf(tmp, sizeof(tmp), "%s/snapshot.tmp", dir);
	snprintf(final, sizeof(final), "%s/snapshot", dir);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	uint8_t *buf = malloc(SNAP_BUF);
	int rc = buf ? 0 : -ENOMEM;
	size_t used = 0;
	off_t off = 0;
	char g[32];
	snprintf(g, sizeof(g), "%llu", (unsigned long long)gen);
	for (size_t i = 0; i <= n && rc == 0; i++) { /* i == 0: the generation */
		const char *key = i ? recs[i - 1].key : GEN_KEY;
		const void *val = i ? recs[i - 1].val : g;
		size_t vlen = i ? recs[i - 1].len : strlen(g), len;
		uint8_t *b = encode(OP_PUT, key, val, vlen, &len);
		if (!b) {
			rc = -ENOMEM;
			break;
		}
		if (used + len > SNAP_BUF && used) { /* flush what is buffered */
			rc = pwrite_all(fd, buf, used, off);
			off += (off_t)used;
			used = 0;
		}
		if (rc == 0 && len > SNAP_BUF) { /* a record bigger than the buffer */
			rc = pwrite_all(fd, b, len, off);
			off += (off_t)len;
		} else if (rc == 0) {
			memcpy(buf + used, b, len);
			used += len;
		}
		free(b);
	}
	if (rc == 0 && used)
		rc = pwrite_all(fd, buf, used, off);
	free(buf);
	if (rc == 0 && fsync(fd) != 0)
		rc = -errno;
	close(fd);
	if (rc == 0 && rename(tmp, final) != 0)
		rc = -errno;
	if (rc == 0)
		rc = fsync_dir(dir);
	if (rc != 0) {
		unlink(tmp);
		return rc;
	}
	remove_sealed_logs(dir, gen);
	return 0;
}

/* A snapshot ended with rc: the table may free what it dropped. mu held. */
static void end_snapshot(kvm_state *st, int rc)
{
	for (size_t i = 0; i < st->grave_n; i++)
		free(st->graveyard[i]);
	st->grave_n = 0;
	free(st->snap_recs);
	st->snap_recs = NULL;
	st->snap_running = false;
	st->snap_rc = rc;
	st->snap_done++;
	if (rc == 0) {
		st->stats.snapshots++;
		st->snapshot_retry_bytes = 0;
	} else {
		st->stats.snapshot_failures++;
		st->snapshot_retry_bytes = st->stats.log_bytes + st->snapshot_bytes / 8;
		kvm_log(KVM_LOG_WARN, "state_snapshot_failed", "dir=%s error=\"%s\" log_bytes=%llu",
			st->dir, strerror(-rc), (unsigned long long)st->stats.log_bytes);
	}
	pthread_cond_broadcast(&st->snap_cv);
}

static void *snapshot_main(void *arg)
{
	kvm_state *st = arg;
	pthread_mutex_lock(&st->mu);
	const record *recs = st->snap_recs;
	size_t n = st->snap_n;
	uint64_t gen = st->snap_gen;
	pthread_mutex_unlock(&st->mu);
	int rc = write_snapshot(st->dir, recs, n, gen);
	pthread_mutex_lock(&st->mu);
	end_snapshot(st, rc);
	pthread_mutex_unlock(&st->mu);
	return NULL;
}

/* Starts a snapshot: seals the active log as "log.GEN" and starts a new
 * one (every record of the sealed one is synced: no syncer runs; records
 * still queued go to the new one), copies the table's pointers, and leaves
 * the writing to a thread. What the lock is held for does not grow with
 * the table's bytes (writing them under it stalled every caller: 0.45 s for
 * 135 MB). -EBUSY: not now (a sync, a preallocation or a snapshot runs);
 * no snapshot while the disk is full. mu held. */
static int start_snapshot(kvm_state *st)
{
	if (st->snap_running || st->syncing || st->alloc_busy)
		return -EBUSY;
	if (st->room_error || st->sync_error)
		return st->room_error ? st->room_error : st->sync_error;
	if (st->snap_thread_joinable) { /* the last one's thread, ended or ending */
		pthread_join(st->snap_thread, NULL);
		st->snap_thread_joinable = false;
	}
	record *copy = malloc((st->n ? st->n : 1) * sizeof(*copy));
	if (!copy)
		return -ENOMEM;
	char active[4096], sealed[4096];
	path_in(st, "log", active, sizeof(active));
	snprintf(sealed, sizeof(sealed), "%s/log.%llu", st->dir, (unsigned long long)st->log_gen);
	if (rename(active, sealed) != 0) {
		free(copy);
		return -errno;
	}
	int fd = open(active, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	int rc = fd < 0 ? -errno : fsync_dir(st->dir); /* the new log's name is durable */
	if (rc != 0) {
		if (fd >= 0) {
			close(fd);
			unlink(active);
		}
		rename(sealed, active); /* as it was */
		free(copy);
		return rc;
	}
	close(st->log_fd);
	st->log_fd = fd;
	st->snap_gen = st->log_gen++;
	st->log_end = st->log_alloc = 0;
	st->stats.log_bytes = st->pending_len;
	memcpy(copy, st->recs, st->n * sizeof(*copy));
	st->snap_recs = copy;
	st->snap_n = st->n;
	st->snap_running = true;
	if (pthread_create(&st->snap_thread, NULL, snapshot_main, st) == 0)
		st->snap_thread_joinable = true;
	else /* no thread: write it here, as before */
		end_snapshot(st, write_snapshot(st->dir, copy, st->n, st->snap_gen));
	want_zeros(st);
	return 0;
}

/* ---- Public ----------------------------------------------------------------------- */

static bool key_ok(const char *key)
{
	if (!key || !key[0] || key[0] == '~' || strlen(key) >= KVM_STATE_MAX_KEY)
		return false; /* "~...": the store's own (GEN_KEY) */
	for (const char *p = key; *p; p++)
		if (*p < 0x21 || *p > 0x7e)
			return false;
	return true;
}

static int cmp_gen(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* At open: replays the sealed logs newer than the snapshot (generation
 * covered, when has_gen), in order, deletes the older ones, and sets the
 * active log's generation after all of them. */
static int replay_sealed_logs(kvm_state *st, bool has_gen, uint64_t covered)
{
	DIR *d = opendir(st->dir);
	if (!d)
		return -errno;
	uint64_t *gens = NULL;
	size_t n = 0, cap = 0;
	int rc = 0;
	struct dirent *e;
	while (rc == 0 && (e = readdir(d)) != NULL) {
		uint64_t g;
		if (!sealed_log_gen(e->d_name, &g))
			continue;
		if (n == cap) {
			cap = cap ? cap * 2 : 8;
			uint64_t *p = realloc(gens, cap * sizeof(*p));
			if (!p) {
				rc = -ENOMEM;
				break;
			}
			gens = p;
		}
		gens[n++] = g;
	}
	closedir(d);
	if (n > 1)
		qsort(gens, n, sizeof(*gens), cmp_gen);
	st->log_gen = has_gen ? covered + 1 : 0;
	for (size_t i = 0; rc == 0 && i < n; i++) {
		char path[4096];
		snprintf(path, sizeof(path), "%s/log.%llu", st->dir, (unsigned long long)gens[i]);
		if (has_gen && gens[i] <= covered) { /* left by a crash after the snapshot */
			unlink(path);
			continue;
		}
		uint8_t *buf;
		size_t len;
		if ((rc = read_file(path, &buf, &len)) != 0)
			break;
		uint64_t ignored;
		replay(st, buf, len, &rc, &ignored, &(bool){false}); /* up to its zeros */
		free(buf);
		if (gens[i] >= st->log_gen)
			st->log_gen = gens[i] + 1;
	}
	free(gens);
	return rc;
}

int kvm_state_open_embedded(const char *dir, uint64_t snapshot_bytes, kvm_state **out)
{
	if (!dir || !out)
		return -EINVAL;
	*out = NULL;
	if (mkdir(dir, 0700) != 0 && errno != EEXIST)
		return -errno;
	kvm_state *st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	st->dir = strdup(dir);
	st->snapshot_bytes = snapshot_bytes ? snapshot_bytes : 64u << 20;
	st->sync_ns = 1000000; /* slow until measured */
	st->lock_fd = st->log_fd = -1;
	pthread_mutex_init(&st->mu, NULL);
	pthread_cond_init(&st->synced_cv, NULL);
	pthread_cond_init(&st->alloc_cv, NULL);
	pthread_cond_init(&st->snap_cv, NULL);
	int rc = -ENOMEM;
	char path[4096];
	if (!st->dir)
		goto fail;

	/* One process per directory: two coordinators on one log would corrupt it. */
	path_in(st, "LOCK", path, sizeof(path));
	st->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (st->lock_fd < 0) {
		rc = -errno;
		goto fail;
	}
	if (flock(st->lock_fd, LOCK_EX | LOCK_NB) != 0) {
		rc = errno == EWOULDBLOCK ? -EBUSY : -errno;
		goto fail;
	}

	uint8_t *buf;
	size_t len;
	path_in(st, "snapshot", path, sizeof(path));
	if ((rc = read_file(path, &buf, &len)) != 0)
		goto fail;
	uint64_t covered = 0;
	bool has_gen = false; /* a snapshot before sealed logs has none */
	size_t good = replay(st, buf, len, &rc, &covered, &has_gen);
	free(buf);
	if (rc == 0 && good != len)
		rc = -EIO; /* a snapshot is atomic: a bad one is damage */
	if (rc != 0)
		goto fail;

	/* Then the sealed logs it does not cover, oldest first (a crash in a
	 * snapshot's writing leaves them), then the active one. */
	if ((rc = replay_sealed_logs(st, has_gen, covered)) != 0)
		goto fail;
	path_in(st, "log", path, sizeof(path));
	if ((rc = read_file(path, &buf, &len)) != 0)
		goto fail;
	uint64_t ignored;
	good = replay(st, buf, len, &rc, &ignored, &(bool){false});
	if (rc != 0) {
		free(buf);
		goto fail;
	}
	st->log_fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
	if (st->log_fd < 0) {
		rc = -errno;
		free(buf);
		goto fail;
	}
	/* After the records: nothing, the zeros of the preallocation (kept), or
	 * a torn record, perhaps followed by zeros. */
	size_t nonzero = len;
	while (nonzero > good && buf[nonzero - 1] == 0)
		nonzero--;
	free(buf);
	st->log_end = (off_t)good;
	st->log_alloc = (off_t)len;
	if (nonzero != good) { /* cut the torn tail so new records follow valid ones */
		st->stats.torn_bytes = nonzero - good;
		if (ftruncate(st->log_fd, (off_t)good) != 0 || fsync(st->log_fd) != 0) {
			rc = -errno;
			goto fail;
		}
		st->log_alloc = (off_t)good;
	}
	st->stats.log_bytes = good;
	/* Without the thread, syncers extend the zeros themselves. */
	st->prealloc_running = pthread_create(&st->prealloc, NULL, prealloc_main, st) == 0;
	pthread_mutex_lock(&st->mu);
	want_zeros(st);
	pthread_mutex_unlock(&st->mu);
	*out = st;
	return 0;
fail:
	kvm_state_close(st);
	return rc;
}

/* Queues a record for the log and updates the table; returns its ticket in
 * *ticket. reserve: the record may use LOG_RESERVE (a delete, an upkeep put).
 * Refused (nothing changed) when the log cannot grow and it does not fit.
 * mu held. A snapshot, when due, makes everything durable itself. */
static int do_append(kvm_state *st, int op, const char *key, const void *val, size_t len,
		     bool reserve, uint64_t *ticket)
{
	size_t n;
	int rc = check_room(st, REC_HEADER + strlen(key) + len, reserve);
	if (rc != 0)
		return rc;
	uint8_t *b = encode(op, key, val, len, &n);
	if (!b)
		return -ENOMEM;
	if (st->pending_len + n > st->pending_cap) {
		size_t cap = (st->pending_len + n) * 2;
		uint8_t *p = realloc(st->pending, cap);
		if (!p) {
			free(b);
			return -ENOMEM;
		}
		st->pending = p;
		st->pending_cap = cap;
	}
	memcpy(st->pending + st->pending_len, b, n);
	st->pending_len += n;
	free(b);
	st->stats.log_bytes += n;
	*ticket = ++st->appended;
	rc = op == OP_PUT ? table_put(st, key, val, len) : table_del(st, key);
	/* A snapshot when due (a busy moment or a full disk: at a later append). */
	if (rc == 0 && st->stats.log_bytes > st->snapshot_bytes &&
	    st->stats.log_bytes >= st->snapshot_retry_bytes && !st->room_error) {
		int src = start_snapshot(st);
		if (src != 0 && src != -EBUSY) {
			st->stats.snapshot_failures++;
			st->snapshot_retry_bytes = st->stats.log_bytes + st->snapshot_bytes / 8;
			kvm_log(KVM_LOG_WARN, "state_snapshot_failed",
				"dir=%s error=\"%s\" log_bytes=%llu", st->dir, strerror(-src),
				(unsigned long long)st->stats.log_bytes);
		}
	}
	return rc;
}

int kvm_state_sync(kvm_state *st, uint64_t ticket)
{
	if (!st)
		return -EINVAL;
	pthread_mutex_lock(&st->mu);
	int rc = 0;
	while (st->synced < ticket && rc == 0) {
		if (st->sync_error) {
			rc = st->sync_error;
		} else if (st->syncing) {
			pthread_cond_wait(&st->synced_cv, &st->mu);
		} else {
			/* Become the syncer for everything queued so far: take the
			 * queue, write and fdatasync it without the lock. */
			uint64_t target = st->appended;
			uint8_t *buf = st->pending;
			size_t len = st->pending_len;
			off_t at = st->log_end, end = at + (off_t)len;
			st->pending = NULL;
			st->pending_len = st->pending_cap = 0;
			st->syncing = true;
			st->syncing_len = len;
			/* No zeros left for these records (the preallocator fell
			 * behind, or none runs): extend them here, after it. */
			bool claimed = end > st->log_alloc, extend = false;
			if (claimed) {
				claim_alloc(st);
				extend = end > st->log_alloc;
			}
			off_t alloc_from = st->log_alloc;
			pthread_mutex_unlock(&st->mu);
			/* log_end is the syncer's alone meanwhile (a snapshot
			 * waits for !syncing). */
			struct timespec t0, t1;
			clock_gettime(CLOCK_MONOTONIC, &t0);
			/* Zeros that cannot be written (a full disk) are no
			 * failure: the records then grow the file themselves. */
			off_t reached = alloc_from;
			int zerr = extend ? write_zeros(st->log_fd, alloc_from, end + LOG_CHUNK, false,
							&reached)
					  : 0;
			int err = pwrite_all(st->log_fd, buf, len, at);
			if (err == 0 && fdatasync(st->log_fd) != 0)
				err = -errno;
			free(buf);
			clock_gettime(CLOCK_MONOTONIC, &t1);
			uint64_t ns = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000u +
				      (uint64_t)t1.tv_nsec - (uint64_t)t0.tv_nsec;
			pthread_mutex_lock(&st->mu);
			st->sync_ns = st->sync_ns - st->sync_ns / 8 + ns / 8;
			if (claimed) {
				if (extend)
					zeros_written(st, reached, zerr);
				release_alloc(st);
			}
			if (err == 0) {
				st->log_end = end;
				if (st->log_alloc < end)
					st->log_alloc = end;
				want_zeros(st);
			}
			st->syncing = false;
			st->syncing_len = 0;
			st->stats.syncs++;
			if (err)
				st->sync_error = err; /* durability is unknown from here on */
			else if (target > st->synced)
				st->synced = target;
			pthread_cond_broadcast(&st->synced_cv);
		}
	}
	pthread_mutex_unlock(&st->mu);
	return rc;
}

uint64_t kvm_state_sync_ns(kvm_state *st)
{
	pthread_mutex_lock(&st->mu);
	uint64_t ns = st->sync_ns;
	pthread_mutex_unlock(&st->mu);
	return ns;
}

static int put_async(kvm_state *st, const char *key, const void *val, size_t len, bool upkeep,
		     uint64_t *ticket)
{
	if (!st || !key_ok(key) || (!val && len) || len > KVM_STATE_MAX_VALUE || !ticket)
		return -EINVAL;
	pthread_mutex_lock(&st->mu);
	int rc = do_append(st, OP_PUT, key, val ? val : "", len, upkeep, ticket);
	pthread_mutex_unlock(&st->mu);
	return rc;
}

int kvm_state_put_async(kvm_state *st, const char *key, const void *val, size_t len,
			uint64_t *ticket)
{
	return put_async(st, key, val, len, false, ticket);
}

int kvm_state_upkeep_async(kvm_state *st, const char *key, const void *val, size_t len,
			   uint64_t *ticket)
{
	return put_async(st, key, val, len, true, ticket);
}

int kvm_state_del_async(kvm_state *st, const char *key, uint64_t *ticket)
{
	if (!st || !key_ok(key) || !ticket)
		return -EINVAL;
	pthread_mutex_lock(&st->mu);
	bool found;
	find(st, key, &found);
	int rc = found ? do_append(st, OP_DEL, key, NULL, 0, true, ticket) : -ENOENT;
	pthread_mutex_unlock(&st->mu);
	return rc;
}

int kvm_state_put(kvm_state *st, const char *key, const void *val, size_t len)
{
	uint64_t t;
	int rc = kvm_state_put_async(st, key, val, len, &t);
	return rc ? rc : kvm_state_sync(st, t);
}

int kvm_state_upkeep(kvm_state *st, const char *key, const void *val, size_t len)
{
	uint64_t t;
	int rc = kvm_state_upkeep_async(st, key, val, len, &t);
	return rc ? rc : kvm_state_sync(st, t);
}

int kvm_state_failed(kvm_state *st)
{
	pthread_mutex_lock(&st->mu);
	int rc = st->sync_error;
	pthread_mutex_unlock(&st->mu);
	return rc;
}

int kvm_state_del(kvm_state *st, const char *key)
{
	uint64_t t;
	int rc = kvm_state_del_async(st, key, &t);
	return rc ? rc : kvm_state_sync(st, t);
}

int kvm_state_get(kvm_state *st, const char *key, void **val, size_t *len)
{
	if (!st || !key_ok(key) || !val || !len)
		return -EINVAL;
	pthread_mutex_lock(&st->mu);
	bool found;
	size_t i = find(st, key, &found);
	int rc = -ENOENT;
	if (found) {
		*val = malloc(st->recs[i].len ? st->recs[i].len : 1);
		if (*val) {
			memcpy(*val, st->recs[i].val, st->recs[i].len);
			*len = st->recs[i].len;
			rc = 0;
		} else {
			rc = -ENOMEM;
		}
	}
	pthread_mutex_unlock(&st->mu);
	return rc;
}

int kvm_state_scan(kvm_state *st, const char *prefix, kvm_state_visit fn, void *arg)
{
	if (!st || !prefix || !fn)
		return -EINVAL;
	size_t plen = strlen(prefix);
	pthread_mutex_lock(&st->mu);
	bool found;
	int rc = 0;
	for (size_t i = find(st, prefix, &found); i < st->n && rc == 0; i++) {
		if (strncmp(st->recs[i].key, prefix, plen) != 0)
			break; /* sorted: past the prefix's range */
		rc = fn(arg, st->recs[i].key, st->recs[i].val, st->recs[i].len);
	}
	pthread_mutex_unlock(&st->mu);
	return rc;
}

int kvm_state_snapshot(kvm_state *st)
{
	if (!st)
		return -EINVAL;
	pthread_mutex_lock(&st->mu);
	for (;;) { /* until nothing else writes the log's files */
		if (st->snap_running)
			pthread_cond_wait(&st->snap_cv, &st->mu);
		else if (st->syncing)
			pthread_cond_wait(&st->synced_cv, &st->mu);
		else if (st->alloc_busy)
			pthread_cond_wait(&st->alloc_cv, &st->mu);
		else
			break;
	}
	uint64_t done = st->snap_done;
	int rc = start_snapshot(st);
	while (rc == 0 && st->snap_done == done)
		pthread_cond_wait(&st->snap_cv, &st->mu);
	if (rc == 0)
		rc = st->snap_rc;
	pthread_mutex_unlock(&st->mu);
	return rc;
}

void kvm_state_stats_get(kvm_state *st, kvm_state_stats *out)
{
	pthread_mutex_lock(&st->mu);
	*out = st->stats;
	out->records = st->n;
	out->appends = st->appended;
	out->room_error = st->room_error;
	out->sync_error = st->sync_error;
	off_t room = room_left(st);
	out->room_bytes = room > 0 ? (uint64_t)room : 0;
	pthread_mutex_unlock(&st->mu);
}

void kvm_state_close(kvm_state *st)
{
	if (!st)
		return;
	pthread_mutex_lock(&st->mu);
	while (st->snap_running) /* it reads the table */
		pthread_cond_wait(&st->snap_cv, &st->mu);
	pthread_mutex_unlock(&st->mu);
	if (st->snap_thread_joinable)
		pthread_join(st->snap_thread, NULL);
	if (st->prealloc_running) {
		pthread_mutex_lock(&st->mu);
		st->prealloc_stop = true;
		pthread_cond_broadcast(&st->alloc_cv);
		pthread_mutex_unlock(&st->mu);
		pthread_join(st->prealloc, NULL);
		st->prealloc_running = false;
	}
	if (st->log_fd >= 0 && st->appended > st->synced)
		kvm_state_sync(st, st->appended); /* what was applied is kept */
	/* A clean close leaves the log as long as its records: the next open
	 * then tells a torn write at the end from nothing. A failure here only
	 * leaves zeros, which the next open skips. */
	if (st->log_fd >= 0 && st->log_alloc > st->log_end && !st->sync_error &&
	    ftruncate(st->log_fd, st->log_end) == 0)
		fsync(st->log_fd);
	free(st->pending);
	for (size_t i = 0; i < st->n; i++) {
		free(st->recs[i].key);
		free(st->recs[i].val);
	}
	free(st->recs);
	free(st->graveyard);
	if (st->log_fd >= 0)
		close(st->log_fd);
	if (st->lock_fd >= 0)
		close(st->lock_fd); /* releases the flock */
	pthread_cond_destroy(&st->synced_cv);
	pthread_cond_destroy(&st->alloc_cv);
	pthread_cond_destroy(&st->snap_cv);
	pthread_mutex_destroy(&st->mu);
	free(st->dir);
	free(st);
}
