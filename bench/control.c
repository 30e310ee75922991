/* make bench-control: the coordinator's control path under load, against its
 * peers in the same run.
 *
 * Starts two real kvmesh-coordinators (one with its data directory on the
 * disk, under /tmp, every change fdatasync'd; one on tmpfs, /dev/shm, where
 * fdatasync costs nothing) and a gRPC echo server built on common/rpc.c (its
 * handlers run inline, as the coordinator's do, and answer at once with
 * responses of the sizes the coordinator sends). Each coordinator gets a
 * model and three nodes.
 *
 * The client: THREADS threads, each with one channel and one kvm_rpc_queue,
 * keeping N CreateSequence + ExtendSequence + ReleaseSequence cycles in
 * flight (each call's end starts its cycle's next call). Each load level N
 * (1, 2, 4, 6, 8, 16) runs rounds that drive the three servers in turn with the
 * same client, so that load drifting on this shared machine hits all three
 * alike; a call's latency runs from its start to its end at the client.
 * The disk's own sync latency (4 KiB append or overwrite + fdatasync, in the
 * disk coordinator's directory's filesystem) is measured before, and the
 * Python gRPC client (one thread, disk coordinator) after, for reference.
 *
 * Final lines, per server: the most calls/s at any level (_max_ for the disk
 * coordinator) with that level's p99, and the most calls/s at a level whose
 * p99 stayed under 2 ms: control_ops_per_s and control_p99_ms are that pair
 * for the disk coordinator (the bar), control_tmpfs_* and
 * grpc_echo_* the same for its peers; control_vs_echo and
 * control_tmpfs_vs_echo compare the most calls/s. Also fdatasync_p50_us,
 * fdatasync_p99_us (appends), fdatasync_overwrite_p50_us,
 * fdatasync_overwrite_p99_us (in place, as the preallocated log writes),
 * python_ops_per_s.
 *
 * KVMESH_BENCH_IN_FLIGHT=N runs level N only. KVMESH_BENCH_COORDINATOR_B=PATH
 * adds a fourth server to every round: that coordinator binary on the disk
 * (on tmpfs with KVMESH_BENCH_B_ON_TMPFS=1), for comparing two builds in one
 * run (control_b_ops_per_s, control_b_vs_control: against the disk or tmpfs
 * coordinator of this build, as B runs).
 *
 * `control --echo-server PORT N1 N2 N3` is the echo server (this program run
 * again, so that it is a process of its own as the coordinator is). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/rpc.h"
#include "proto/kvmesh.pb-c.h"

#define THREADS 2 /* client threads */
#define ROUNDS 2
#define SECONDS 1.5 /* per server per round */
#define N_LEVELS 6
/* Cycles in flight per client thread, one level after the other
 * (KVMESH_BENCH_IN_FLIGHT=N: only N). */
static const unsigned levels[N_LEVELS] = {1, 2, 4, 6, 8, 16};
#define LONG_BLOCKS 8192 /* a 128k-token context at 16 tokens a block */
#define LONG_EXTENDS 500
#define LIST_SEQS 2000  /* sequences of LIST_BLOCKS blocks: a million placements */
#define LIST_BLOCKS 500
#define P99_BAR_MS 2.0
#define MAX_SAMPLES (1 << 20)
#define SYNC_WRITES 200

extern char **environ;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static const char *names[3] = {"CreateSequence", "ExtendSequence", "ReleaseSequence"};

/* One call of a packed request; returns its status code, and the
 * response's size in *resp_len when not NULL. */
static int call(kvm_rpc_channel *ch, const char *method, const void *req, size_t req_len,
		size_t *resp_len)
{
	char path[96];
	snprintf(path, sizeof(path), "/kvmesh.v1.Coordinator/%s", method);
	void *resp;
	size_t len;
	kvm_rpc_status st;
	if (kvm_rpc_unary(ch, path, req, req_len, 5000, &resp, &len, &st) != 0)
		return KVM_RPC_UNAVAILABLE;
	if (st.code == KVM_RPC_OK) {
		free(resp);
		if (resp_len)
			*resp_len = len;
	} else {
		fprintf(stderr, "bench-control: %s: %d %s\n", method, st.code, st.message);
	}
	return st.code;
}

/* Packs m and calls. */
static int call_msg(kvm_rpc_channel *ch, const char *method, const ProtobufCMessage *m)
{
	uint8_t buf[4096];
	return call(ch, method, buf, protobuf_c_message_pack(m, buf), NULL);
}

/* The three requests of one create + extend + release cycle of sequence
 * id, packed into out[j] (lens in len[j]). */
static void pack_cycle(const char *id, uint8_t out[3][512], size_t len[3])
{
	uint32_t prompt[64];
	for (int i = 0; i < 64; i++)
		prompt[i] = (uint32_t)i;
	Kvmesh__V1__CreateSequenceRequest cr = KVMESH__V1__CREATE_SEQUENCE_REQUEST__INIT;
	cr.model_id = "bench";
	cr.sequence_id = (char *)id;
	cr.n_prompt_tokens = 64;
	cr.prompt_tokens = prompt;
	Kvmesh__V1__ExtendSequenceRequest er = KVMESH__V1__EXTEND_SEQUENCE_REQUEST__INIT;
	er.sequence_id = (char *)id;
	er.tokens = 16;
	Kvmesh__V1__ReleaseSequenceRequest rr = KVMESH__V1__RELEASE_SEQUENCE_REQUEST__INIT;
	rr.sequence_id = (char *)id;
	const ProtobufCMessage *msgs[3] = {&cr.base, &er.base, &rr.base};
	for (int j = 0; j < 3; j++)
		len[j] = protobuf_c_message_pack(msgs[j], out[j]);
}

/* One cycle, call after call; sizes[j] gets each response's size. Returns
 * the number of failed calls. */
static int cycle(kvm_rpc_channel *ch, const char *id, size_t sizes[3])
{
	uint8_t req[3][512];
	size_t len[3];
	pack_cycle(id, req, len);
	int errors = 0;
	for (int j = 0; j < 3; j++)
		errors += call(ch, names[j], req[j], len[j], &sizes[j]) != KVM_RPC_OK;
	return errors;
}

/* ---- Load: THREADS client threads, each with `in_flight` cycles going -------- */

typedef struct sample_sink {
	double *lat;
	size_t n, cap;
} sample_sink;

/* One cycle in progress: which call it is at, and when that call began. */
typedef struct cycle_state {
	char id[64];
	uint8_t req[3][512];
	size_t len[3];
	int step;
	double t0;
} cycle_state;

typedef struct worker {
	const char *target, *tag;
	int id;
	unsigned round, in_flight;
	sample_sink s;
	int errors;
	double stop_at;
} worker;

static int start_step(kvm_rpc_channel *ch, kvm_rpc_queue *q, cycle_state *cs)
{
	char path[96];
	snprintf(path, sizeof(path), "/kvmesh.v1.Coordinator/%s", names[cs->step]);
	cs->t0 = now();
	return kvm_rpc_unary_start(ch, q, path, cs->req[cs->step], cs->len[cs->step], 5000, cs);
}

static void new_cycle(worker *w, cycle_state *cs, unsigned k)
{
	snprintf(cs->id, sizeof(cs->id), "%s%u-w%d-%u", w->tag, w->round, w->id, k);
	pack_cycle(cs->id, cs->req, cs->len);
	cs->step = 0;
}

/* The cycles run side by side on one channel and one queue: each call's end
 * starts the cycle's next call, or a new cycle, until stop_at. */
static void *run(void *arg)
{
	worker *w = arg;
	kvm_rpc_channel *ch;
	kvm_rpc_queue *q;
	kvm_rpc_channel_open(w->target, &ch);
	kvm_rpc_queue_create(&q);
	cycle_state *cs = calloc(w->in_flight, sizeof(*cs));
	unsigned k = 0, running = 0;
	for (unsigned i = 0; i < w->in_flight; i++) {
		new_cycle(w, &cs[i], k++);
		if (start_step(ch, q, &cs[i]) == 0)
			running++;
		else
			w->errors++;
	}
	while (running > 0) {
		void *tag, *resp;
		size_t len;
		kvm_rpc_status st;
		int rc = kvm_rpc_queue_next(q, -1, &tag, &resp, &len, &st);
		if (rc == 0 || !tag)
			break;
		running--;
		cycle_state *c = tag;
		double t = now();
		if (rc == 1 && st.code == KVM_RPC_OK) {
			free(resp);
		} else {
			w->errors++;
			fprintf(stderr, "bench-control: %s: %d %s\n", names[c->step],
				rc == 1 ? st.code : rc, rc == 1 ? st.message : "");
		}
		if (w->s.n < w->s.cap)
			w->s.lat[w->s.n++] = t - c->t0;
		if (++c->step == 3) {
			if (t >= w->stop_at)
				continue; /* this cycle ends; the others finish theirs */
			new_cycle(w, c, k++);
		}
		if (start_step(ch, q, c) == 0)
			running++;
		else
			w->errors++;
	}
	free(cs);
	kvm_rpc_queue_destroy(q);
	kvm_rpc_channel_close(ch);
	return NULL;
}

/* What one server got over all rounds. */
typedef struct result {
	const char *target, *tag;
	double *lat; /* every call's latency, s */
	size_t n;
	double elapsed;
	int errors;
} result;

static void load_round(result *r, unsigned round, unsigned in_flight)
{
	worker w[THREADS];
	pthread_t t[THREADS];
	double start = now();
	size_t cap = MAX_SAMPLES / (THREADS * ROUNDS);
	for (int i = 0; i < THREADS; i++) {
		w[i] = (worker){.target = r->target, .tag = r->tag, .id = i, .round = round,
				.in_flight = in_flight,
				.s = {.lat = malloc(sizeof(double) * cap), .cap = cap},
				.stop_at = start + SECONDS};
		pthread_create(&t[i], NULL, run, &w[i]);
	}
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	r->elapsed += now() - start;
	for (int i = 0; i < THREADS; i++) {
		memcpy(r->lat + r->n, w[i].s.lat, w[i].s.n * sizeof(double));
		r->n += w[i].s.n;
		r->errors += w[i].errors;
		free(w[i].s.lat);
	}
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double pct(const double *sorted, size_t n, int p)
{
	return n ? sorted[n * (size_t)p / 100] : 0;
}

/* ---- Servers ------------------------------------------------------------------- */

/* Waits for the port before a channel is opened: a gRPC channel that fails
 * to connect backs off for seconds. */
/* Extends of one sequence already `blocks` long, one block at a time, n
 * times, call after call; p50 and p99 (ms) of one extend into out[0..1].
 * Returns the number of failed calls. */
static int long_extends(const char *target, unsigned blocks, unsigned n, double out[2])
{
	kvm_rpc_channel *ch;
	kvm_rpc_channel_open(target, &ch);
	char id[32];
	snprintf(id, sizeof(id), "long-%u", blocks);
	uint32_t one = 1;
	Kvmesh__V1__CreateSequenceRequest cr = KVMESH__V1__CREATE_SEQUENCE_REQUEST__INIT;
	cr.model_id = "bench", cr.sequence_id = id, cr.n_prompt_tokens = 1, cr.prompt_tokens = &one;
	Kvmesh__V1__ExtendSequenceRequest er = KVMESH__V1__EXTEND_SEQUENCE_REQUEST__INIT;
	er.sequence_id = id, er.tokens = blocks * 16 - 1;
	int errors = call_msg(ch, "CreateSequence", &cr.base) != KVM_RPC_OK;
	if (blocks > 1)
		errors += call_msg(ch, "ExtendSequence", &er.base) != KVM_RPC_OK;
	er.tokens = 16;
	uint8_t req[128];
	size_t len = protobuf_c_message_pack(&er.base, req);
	double *lat = calloc(n, sizeof(*lat));
	for (unsigned i = 0; lat && i < n; i++) {
		double t0 = now();
		errors += call(ch, "ExtendSequence", req, len, NULL) != KVM_RPC_OK;
		lat[i] = (now() - t0) * 1e3;
	}
	if (lat) {
		qsort(lat, n, sizeof(*lat), cmp);
		out[0] = pct(lat, n, 50), out[1] = pct(lat, n, 99);
	}
	free(lat);
	Kvmesh__V1__ReleaseSequenceRequest rr = KVMESH__V1__RELEASE_SEQUENCE_REQUEST__INIT;
	rr.sequence_id = id;
	errors += call_msg(ch, "ReleaseSequence", &rr.base) != KVM_RPC_OK;
	kvm_rpc_channel_close(ch);
	return errors;
}

/* ListSequences (a page of 100) in a cluster of LIST_SEQS sequences of
 * LIST_BLOCKS blocks, against a GetSequence of a 1-block sequence: p50 (ms)
 * of each into out[0..1]. A list holds the coordinator's lock while it
 * runs, so its cost is a stall of every other control call. Returns the
 * number of failed calls. */
static int list_cost(const char *target, double out[2])
{
	kvm_rpc_channel *ch;
	kvm_rpc_channel_open(target, &ch);
	int errors = 0;
	uint32_t one = 1;
	char id[32];
	for (unsigned i = 0; i <= LIST_SEQS; i++) { /* the last: the 1-block probe */
		snprintf(id, sizeof(id), "list-%u", i);
		Kvmesh__V1__CreateSequenceRequest cr = KVMESH__V1__CREATE_SEQUENCE_REQUEST__INIT;
		cr.model_id = "bench", cr.sequence_id = id, cr.n_prompt_tokens = 1;
		cr.prompt_tokens = &one;
		errors += call_msg(ch, "CreateSequence", &cr.base) != KVM_RPC_OK;
		Kvmesh__V1__ExtendSequenceRequest er = KVMESH__V1__EXTEND_SEQUENCE_REQUEST__INIT;
		er.sequence_id = id, er.tokens = LIST_BLOCKS * 16 - 1;
		if (i < LIST_SEQS)
			errors += call_msg(ch, "ExtendSequence", &er.base) != KVM_RPC_OK;
	}
	Kvmesh__V1__ListSequencesRequest lr = KVMESH__V1__LIST_SEQUENCES_REQUEST__INIT;
	lr.limit = 100;
	Kvmesh__V1__GetSequenceRequest gr = KVMESH__V1__GET_SEQUENCE_REQUEST__INIT;
	gr.sequence_id = id;
	const ProtobufCMessage *m[2] = {&lr.base, &gr.base};
	const char *method[2] = {"ListSequences", "GetSequence"};
	for (int k = 0; k < 2; k++) {
		double lat[20];
		for (int i = 0; i < 20; i++) {
			double t0 = now();
			errors += call_msg(ch, method[k], m[k]) != KVM_RPC_OK;
			lat[i] = (now() - t0) * 1e3;
		}
		qsort(lat, 20, sizeof(*lat), cmp);
		out[k] = pct(lat, 20, 50);
	}
	for (unsigned i = 0; i <= LIST_SEQS; i++) {
		snprintf(id, sizeof(id), "list-%u", i);
		Kvmesh__V1__ReleaseSequenceRequest rr = KVMESH__V1__RELEASE_SEQUENCE_REQUEST__INIT;
		rr.sequence_id = id;
		errors += call_msg(ch, "ReleaseSequence", &rr.base) != KVM_RPC_OK;
	}
	kvm_rpc_channel_close(ch);
	return errors;
}

static void wait_port(int port)
{
	for (int i = 0; i < 200; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
		sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		int ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
		close(fd);
		if (ok)
			return;
		usleep(25000);
	}
}

static int start_coordinator(const char *bin, const char *dir, int port, pid_t *pid)
{
	char listen_arg[96], dir_arg[PATH_MAX + 16];
	snprintf(listen_arg, sizeof(listen_arg), "--listen=127.0.0.1:%d", port);
	snprintf(dir_arg, sizeof(dir_arg), "--data-dir=%s", dir);
	char *args[] = {(char *)bin, listen_arg, dir_arg, "--dead-after=600s", NULL};
	if (posix_spawn(pid, bin, NULL, NULL, args, environ) != 0) {
		fprintf(stderr, "bench-control: cannot start %s\n", bin);
		return -1;
	}
	wait_port(port);
	return 0;
}

/* The model and three nodes with room for every cycle in flight; each
 * node's registration epoch into epochs[], for its heartbeats. */
static int set_up(const char *target, uint64_t epochs[3])
{
	kvm_rpc_channel *ch;
	kvm_rpc_channel_open(target, &ch);
	Kvmesh__V1__BlockGeometry geo = KVMESH__V1__BLOCK_GEOMETRY__INIT;
	geo.layers = 32, geo.kv_heads = 8, geo.head_dim = 128, geo.block_tokens = 16;
	geo.dtype = KVMESH__V1__KV_DTYPE__KV_DTYPE_F16;
	Kvmesh__V1__Model model = KVMESH__V1__MODEL__INIT;
	model.id = "bench", model.q_heads = 32, model.geometry = &geo;
	int rc = KVM_RPC_UNAVAILABLE;
	for (int i = 0; i < 100 && rc != KVM_RPC_OK; i++) {
		rc = call_msg(ch, "RegisterModel", &model.base);
		if (rc != KVM_RPC_OK)
			usleep(50000);
	}
	for (int i = 0; i < 3 && rc == KVM_RPC_OK; i++) {
		char id[16], addr[32];
		snprintf(id, sizeof(id), "node%d", i);
		snprintf(addr, sizeof(addr), "127.0.0.1:%d", 9000 + i);
		Kvmesh__V1__TierCapacity cap = KVMESH__V1__TIER_CAPACITY__INIT, *caps[1] = {&cap};
		cap.tier = KVMESH__V1__TIER__TIER_HOST, cap.total_blocks = 1u << 20;
		Kvmesh__V1__Node node = KVMESH__V1__NODE__INIT;
		node.id = id, node.grpc_address = addr, node.data_address = addr;
		node.n_capacity = 1, node.capacity = caps;
		Kvmesh__V1__RegisterNodeRequest req = KVMESH__V1__REGISTER_NODE_REQUEST__INIT;
		req.node = &node;
		uint8_t buf[4096];
		size_t len = protobuf_c_message_pack(&req.base, buf);
		void *resp;
		size_t resp_len;
		kvm_rpc_status st;
		rc = kvm_rpc_unary(ch, "/kvmesh.v1.Coordinator/RegisterNode", buf, len, 5000, &resp,
				   &resp_len, &st) == 0 ? (int)st.code : KVM_RPC_UNAVAILABLE;
		if (rc == KVM_RPC_OK) {
			Kvmesh__V1__RegisterNodeResponse *r =
				kvmesh__v1__register_node_response__unpack(NULL, resp_len, resp);
			epochs[i] = r ? r->epoch : 0;
			if (r)
				kvmesh__v1__register_node_response__free_unpacked(r, NULL);
			free(resp);
		}
	}
	kvm_rpc_channel_close(ch);
	return rc == KVM_RPC_OK ? 0 : -1;
}

/* The nodes' heartbeats, as their agents would send them (every 200 ms):
 * the coordinators hand over the commands they queue for the nodes
 * (blocks to release), instead of queueing them up and dropping them. */
typedef struct heartbeats {
	const char *target[3];
	uint64_t epochs[3][3];
	int n;
	atomic_bool stop;
} heartbeats;

static void *heartbeat_main(void *arg)
{
	heartbeats *h = arg;
	kvm_rpc_channel *ch[3];
	for (int t = 0; t < h->n; t++)
		kvm_rpc_channel_open(h->target[t], &ch[t]);
	while (!atomic_load(&h->stop)) {
		for (int t = 0; t < h->n; t++)
			for (int i = 0; i < 3; i++) {
				char id[16];
				snprintf(id, sizeof(id), "node%d", i);
				Kvmesh__V1__HeartbeatRequest req = KVMESH__V1__HEARTBEAT_REQUEST__INIT;
				req.node_id = id;
				req.epoch = h->epochs[t][i];
				uint8_t buf[256];
				size_t len = protobuf_c_message_pack(&req.base, buf);
				void *resp;
				size_t resp_len;
				kvm_rpc_status st;
				if (kvm_rpc_unary(ch[t], "/kvmesh.v1.Coordinator/Heartbeat", buf, len,
						  5000, &resp, &resp_len, &st) == 0 &&
				    st.code == KVM_RPC_OK)
					free(resp);
			}
		usleep(200000);
	}
	for (int t = 0; t < h->n; t++)
		kvm_rpc_channel_close(ch[t]);
	return NULL;
}

/* The echo peer: the three methods answer at once with a reply of the size
 * the coordinator sends for them (zero bytes: the client does not decode). */
static size_t echo_sizes[3];

static int echo(void *arg, kvm_rpc_call *c, const uint8_t *req, size_t len)
{
	(void)req, (void)len;
	static const uint8_t zeros[4096];
	size_t n = *(size_t *)arg;
	return kvm_rpc_reply(c, zeros, n < sizeof(zeros) ? n : sizeof(zeros)) == 0
		       ? KVM_RPC_OK
		       : KVM_RPC_INTERNAL;
}

static int echo_server_main(char **argv)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL); /* before gRPC starts its threads */
	char addr[64];
	snprintf(addr, sizeof(addr), "127.0.0.1:%s", argv[0]);
	kvm_rpc_server *srv;
	if (kvm_rpc_server_create(addr, NULL, &srv) != 0)
		return 1;
	for (int j = 0; j < 3; j++) {
		echo_sizes[j] = strtoul(argv[1 + j], NULL, 10);
		char path[96];
		snprintf(path, sizeof(path), "/kvmesh.v1.Coordinator/%s", names[j]);
		kvm_rpc_server_add_method(srv, path, KVM_RPC_INLINE, echo, &echo_sizes[j]);
	}
	if (kvm_rpc_server_start(srv) != 0)
		return 1;
	int sig;
	sigwait(&set, &sig);
	kvm_rpc_server_destroy(srv, 1000);
	return 0;
}

/* ---- The disk's sync latency ------------------------------------------------------ */

/* SYNC_WRITES appends of 4 KiB, each fdatasync'd (the file grows, so each
 * sync also commits its new size), then the same writes over those blocks
 * (the file keeps its size), as the coordinator's preallocated log does: the
 * floor under a durable change's latency on this filesystem. */
static void fdatasync_probe(const char *dir, double p50_us[2], double p99_us[2])
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/fdatasync-probe", dir);
	int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
	static uint8_t block[4096];
	memset(block, 0x5a, sizeof(block));
	for (int pass = 0; pass < 2; pass++) {
		double lat[SYNC_WRITES];
		size_t n = 0;
		for (int i = 0; fd >= 0 && i < SYNC_WRITES; i++) {
			double t0 = now();
			if (pwrite(fd, block, sizeof(block), (off_t)i * 4096) != (ssize_t)sizeof(block) ||
			    fdatasync(fd) != 0)
				break;
			lat[n++] = now() - t0;
		}
		qsort(lat, n, sizeof(double), cmp);
		p50_us[pass] = pct(lat, n, 50) * 1e6;
		p99_us[pass] = pct(lat, n, 99) * 1e6;
	}
	if (fd >= 0)
		close(fd);
	unlink(path);
}

static const char python_cycle[] =
	"import os,sys,subprocess,tempfile,time\n"
	"root=sys.argv[2]; out=tempfile.mkdtemp()\n"
	"subprocess.run([sys.executable,'-m','grpc_tools.protoc','-I'+root+'/proto','--python_out='+out,"
	"'--grpc_python_out='+out,root+'/proto/kvmesh.proto'],check=True)\n"
	"sys.path.insert(0,out)\n"
	"import grpc,kvmesh_pb2 as pb,kvmesh_pb2_grpc as g\n"
	"s=g.CoordinatorStub(grpc.insecure_channel(sys.argv[1]))\n"
	"n=0; t=time.time(); k=0\n"
	"while time.time()-t<2:\n"
	"  i='py-%d'%k; k+=1\n"
	"  s.CreateSequence(pb.CreateSequenceRequest(model_id='bench',sequence_id=i,prompt_tokens=list(range(64))),timeout=5)\n"
	"  s.ExtendSequence(pb.ExtendSequenceRequest(sequence_id=i,tokens=16),timeout=5)\n"
	"  s.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=i),timeout=5); n+=3\n"
	"print('python_ops_per_s=%.0f'%(n/(time.time()-t)))\n";

static void stop(pid_t pid)
{
	if (pid > 0) {
		kill(pid, SIGTERM);
		waitpid(pid, NULL, 0);
	}
}

static void remove_dir(const char *dir)
{
	char cmd[PATH_MAX + 16];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "bench-control: could not remove %s\n", dir);
}

int main(int argc, char **argv)
{
	if (argc == 6 && strcmp(argv[1], "--echo-server") == 0)
		return echo_server_main(argv + 2);
	char self[PATH_MAX], bin[PATH_MAX + 64], root[PATH_MAX];
	if (!realpath(argv[0], self)) {
		perror("realpath");
		return 1;
	}
	snprintf(bin, sizeof(bin), "%s/../bin/kvmesh-coordinator", dirname(strdupa(self)));
	if (!getcwd(root, sizeof(root)))
		return 1;
	char disk_dir[] = "/tmp/kvmesh-bench-control-XXXXXX";
	char shm_dir[] = "/dev/shm/kvmesh-bench-control-XXXXXX";
	/* KVMESH_BENCH_B_ON_TMPFS=1: the B build on tmpfs, to compare with the tmpfs one. */
	const char *b_tmpfs = getenv("KVMESH_BENCH_B_ON_TMPFS");
	char b_dir[64];
	snprintf(b_dir, sizeof(b_dir), "%s/kvmesh-bench-control-b-XXXXXX",
		 b_tmpfs && b_tmpfs[0] == '1' ? "/dev/shm" : "/tmp");
	const char *bin_b = getenv("KVMESH_BENCH_COORDINATOR_B");
	int servers = bin_b && bin_b[0] ? 4 : 3;
	if (!mkdtemp(disk_dir) || !mkdtemp(shm_dir) || !mkdtemp(b_dir))
		return 1;

	const char *inf = getenv("KVMESH_BENCH_IN_FLIGHT");
	unsigned in_flight = inf && atoi(inf) > 0 ? (unsigned)atoi(inf) : 0;
	double sync50[2], sync99[2];
	fdatasync_probe(disk_dir, sync50, sync99);

	int base = 20000 + getpid() % 20000;
	char targets[4][64];
	for (int i = 0; i < 4; i++)
		snprintf(targets[i], sizeof(targets[i]), "127.0.0.1:%d", base + i);
	pid_t coord = -1, coord_shm = -1, echo_pid = -1, coord_b = -1;
	int rc = 1;
	heartbeats beats = {.target = {targets[0], targets[1], targets[3]},
			    .n = servers == 4 ? 3 : 2};
	pthread_t beat_thread;
	bool beating = false;
	if (start_coordinator(bin, disk_dir, base, &coord) != 0 ||
	    start_coordinator(bin, shm_dir, base + 1, &coord_shm) != 0 ||
	    set_up(targets[0], beats.epochs[0]) != 0 || set_up(targets[1], beats.epochs[1]) != 0)
		goto out;
	if (servers == 4 && (start_coordinator(bin_b, b_dir, base + 3, &coord_b) != 0 ||
			     set_up(targets[3], beats.epochs[2]) != 0))
		goto out;
	beating = pthread_create(&beat_thread, NULL, heartbeat_main, &beats) == 0;

	/* The coordinator's response sizes, for the echo peer. */
	size_t sizes[3] = {0};
	kvm_rpc_channel *ch;
	kvm_rpc_channel_open(targets[0], &ch);
	int probe_errors = cycle(ch, "probe", sizes);
	kvm_rpc_channel_close(ch);
	if (probe_errors)
		goto out;
	char port_s[16], sz[3][24];
	snprintf(port_s, sizeof(port_s), "%d", base + 2);
	for (int j = 0; j < 3; j++)
		snprintf(sz[j], sizeof(sz[j]), "%zu", sizes[j]);
	char *eargs[] = {self, "--echo-server", port_s, sz[0], sz[1], sz[2], NULL};
	if (posix_spawn(&echo_pid, self, NULL, NULL, eargs, environ) != 0)
		goto out;
	wait_port(base + 2);

	/* Each load level: rounds that rotate the servers; per server, its
	 * calls/s and latency over the level's rounds. */
	const char *label[4] = {"disk", "tmpfs", "echo", "B"};
	double ops[N_LEVELS][4], p50[N_LEVELS][4], p99[N_LEVELS][4];
	int errors = 0;
	unsigned n_levels = 0;
	for (; n_levels < N_LEVELS; n_levels++) {
		unsigned lv = in_flight ? in_flight : levels[n_levels];
		result res[4] = {{.target = targets[0], .tag = "d"},
				 {.target = targets[1], .tag = "t"},
				 {.target = targets[2], .tag = "e"},
				 {.target = targets[3], .tag = "b"}};
		for (int i = 0; i < servers; i++)
			res[i].lat = malloc(sizeof(double) * MAX_SAMPLES);
		for (unsigned r = 0; r < ROUNDS; r++)
			for (int i = 0; i < servers; i++) /* no server always first */
				load_round(&res[(i + r) % servers], n_levels * ROUNDS + r, lv);
		for (int i = 0; i < servers; i++) {
			qsort(res[i].lat, res[i].n, sizeof(double), cmp);
			ops[n_levels][i] = res[i].n / res[i].elapsed;
			p50[n_levels][i] = pct(res[i].lat, res[i].n, 50) * 1e3;
			p99[n_levels][i] = pct(res[i].lat, res[i].n, 99) * 1e3;
			errors += res[i].errors;
			free(res[i].lat);
			printf("bench-control: %u x %2u in flight  %-6s %7.0f calls/s  p50 %.3f ms  "
			       "p99 %.3f ms\n",
			       THREADS, lv, label[i], ops[n_levels][i], p50[n_levels][i],
			       p99[n_levels][i]);
		}
		fflush(stdout);
		if (in_flight) {
			n_levels++;
			break; /* one level, as asked */
		}
	}
	/* Per server: its most calls/s (at any level), and its most at a level
	 * where p99 stayed under P99_BAR_MS (0 if none did). */
	double top[4] = {0}, top_p99[4] = {0}, within[4] = {0}, within_p99[4] = {0};
	for (unsigned l = 0; l < n_levels; l++)
		for (int i = 0; i < servers; i++) {
			if (ops[l][i] > top[i])
				top[i] = ops[l][i], top_p99[i] = p99[l][i];
			if (p99[l][i] < P99_BAR_MS && ops[l][i] > within[i])
				within[i] = ops[l][i], within_p99[i] = p99[l][i];
		}
	printf("bench-control: %d client threads, each with N cycles in flight on one channel; "
	       "%d rounds of %.1f s per server and level; calls are create+extend+release "
	       "cycles; response bytes %zu/%zu/%zu; %d errors\n",
	       THREADS, ROUNDS, SECONDS, sizes[0], sizes[1], sizes[2], errors);
	printf("bench-control: disk dir %s, tmpfs dir %s\n", disk_dir, shm_dir);

	/* Extends of a long sequence against a short one's, on disk: each
	 * extend should cost what it adds, not the sequence's length. */
	double ext_short[2] = {0}, ext_long[2] = {0}, ext_long_b[2] = {0};
	errors += long_extends(targets[0], 1, LONG_EXTENDS, ext_short);
	errors += long_extends(targets[0], LONG_BLOCKS, LONG_EXTENDS, ext_long);
	if (servers == 4)
		errors += long_extends(targets[3], LONG_BLOCKS, LONG_EXTENDS, ext_long_b);
	printf("bench-control: %u extends by one block, disk: of a 1-block sequence p50 %.3f "
	       "p99 %.3f ms; of a %u-block one p50 %.3f p99 %.3f ms",
	       LONG_EXTENDS, ext_short[0], ext_short[1], LONG_BLOCKS, ext_long[0], ext_long[1]);
	if (servers == 4)
		printf("; B build p50 %.3f p99 %.3f ms", ext_long_b[0], ext_long_b[1]);
	printf("\n");

	double list_ms[2] = {0}, list_ms_b[2] = {0};
	errors += list_cost(targets[0], list_ms);
	if (servers == 4)
		errors += list_cost(targets[3], list_ms_b);
	printf("bench-control: %u sequences of %u blocks, disk: ListSequences (100) p50 %.3f ms, "
	       "GetSequence p50 %.3f ms",
	       LIST_SEQS, LIST_BLOCKS, list_ms[0], list_ms[1]);
	if (servers == 4)
		printf("; B build %.3f and %.3f ms", list_ms_b[0], list_ms_b[1]);
	printf("\n");

	/* The Python client, one thread, for reference. */
	fflush(stdout);
	char *pargs[] = {"/usr/bin/python3", "-c", (char *)python_cycle, targets[0], root, NULL};
	pid_t py;
	if (posix_spawn(&py, pargs[0], NULL, NULL, pargs, environ) == 0)
		waitpid(py, NULL, 0);

	printf("fdatasync_p50_us=%.0f\n", sync50[0]);
	printf("fdatasync_p99_us=%.0f\n", sync99[0]);
	printf("fdatasync_overwrite_p50_us=%.0f\n", sync50[1]);
	printf("fdatasync_overwrite_p99_us=%.0f\n", sync99[1]);
	printf("grpc_echo_ops_per_s=%.0f\n", top[2]);
	printf("grpc_echo_p99_ms=%.3f\n", top_p99[2]);
	printf("grpc_echo_ops_per_s_p99_under_2ms=%.0f\n", within[2]);
	printf("control_tmpfs_ops_per_s=%.0f\n", top[1]);
	printf("control_tmpfs_p99_ms=%.3f\n", top_p99[1]);
	printf("control_tmpfs_ops_per_s_p99_under_2ms=%.0f\n", within[1]);
	printf("control_tmpfs_vs_echo=%.3f\n", top[1] / top[2]);
	printf("control_vs_echo=%.3f\n", top[0] / top[2]);
	printf("control_long_extend_p99_ms=%.3f\n", ext_long[1]);
	printf("control_long_vs_short_extend_p50=%.3f\n", ext_long[0] / ext_short[0]);
	printf("control_list_ms=%.3f\n", list_ms[0]);
	printf("control_list_vs_get=%.3f\n", list_ms[0] / list_ms[1]);
	if (servers == 4) {
		printf("control_b_ops_per_s=%.0f\n", top[3]);
		printf("control_b_p99_ms=%.3f\n", top_p99[3]);
		printf("control_b_vs_control=%.3f\n",
		       top[3] / top[b_tmpfs && b_tmpfs[0] == '1' ? 1 : 0]);
	}
	/* The bar's pair last: most calls/s on disk with p99 under 2 ms, and
	 * that p99 (0 and 0: no level kept p99 under 2 ms). */
	printf("control_max_ops_per_s=%.0f\n", top[0]);
	printf("control_max_p99_ms=%.3f\n", top_p99[0]);
	printf("control_ops_per_s=%.0f\n", within[0]);
	printf("control_p99_ms=%.3f\n", within_p99[0]);
	rc = errors ? 1 : 0;
out:
	if (beating) {
		atomic_store(&beats.stop, true);
		pthread_join(beat_thread, NULL);
	}
	stop(coord_b);
	stop(echo_pid);
	stop(coord);
	stop(coord_shm);
	remove_dir(disk_dir);
	remove_dir(shm_dir);
	remove_dir(b_dir);
	return rc;
}
