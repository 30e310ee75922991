/* make bench-control: the coordinator's control path under load. Starts a
 * real kvmesh-coordinator (own data directory, fsync'd state), registers a
 * model and three nodes, then client threads run CreateSequence +
 * ExtendSequence + ReleaseSequence cycles over gRPC on loopback for a few
 * seconds; every call's latency is recorded. The same cycle from the Python
 * gRPC client (one thread) runs after, for reference.
 *
 * Final lines: control_ops_per_s (calls per second, all three kinds),
 * control_p50_ms, control_p99_ms, python_ops_per_s. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/rpc.h"
#include "proto/kvmesh.pb-c.h"

#define THREADS 8
#define SECONDS 4.0
#define MAX_SAMPLES (1 << 20)

extern char **environ;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static char target[64];

/* One call; returns its status code. */
static int call(kvm_rpc_channel *ch, const char *method, const ProtobufCMessage *m)
{
	uint8_t buf[4096];
	size_t n = protobuf_c_message_pack(m, buf);
	char path[96];
	snprintf(path, sizeof(path), "/kvmesh.v1.Coordinator/%s", method);
	void *resp;
	size_t len;
	kvm_rpc_status st;
	if (kvm_rpc_unary(ch, path, buf, n, 5000, &resp, &len, &st) != 0)
		return KVM_RPC_UNAVAILABLE;
	if (st.code == KVM_RPC_OK)
		free(resp);
	else
		fprintf(stderr, "bench-control: %s: %d %s\n", method, st.code, st.message);
	return st.code;
}

typedef struct worker {
	int id;
	double *lat;
	size_t n;
	int errors;
	double stop_at;
} worker;

static void *run(void *arg)
{
	worker *w = arg;
	kvm_rpc_channel *ch;
	kvm_rpc_channel_open(target, &ch);
	uint32_t prompt[64];
	for (int i = 0; i < 64; i++)
		prompt[i] = (uint32_t)i;
	for (unsigned k = 0; now() < w->stop_at; k++) {
		char id[64];
		snprintf(id, sizeof(id), "w%d-%u", w->id, k);
		Kvmesh__V1__CreateSequenceRequest cr = KVMESH__V1__CREATE_SEQUENCE_REQUEST__INIT;
		cr.model_id = "bench";
		cr.sequence_id = id;
		cr.n_prompt_tokens = 64;
		cr.prompt_tokens = prompt;
		Kvmesh__V1__ExtendSequenceRequest er = KVMESH__V1__EXTEND_SEQUENCE_REQUEST__INIT;
		er.sequence_id = id;
		er.tokens = 16;
		Kvmesh__V1__ReleaseSequenceRequest rr = KVMESH__V1__RELEASE_SEQUENCE_REQUEST__INIT;
		rr.sequence_id = id;
		const ProtobufCMessage *msgs[3] = {&cr.base, &er.base, &rr.base};
		static const char *names[3] = {"CreateSequence", "ExtendSequence", "ReleaseSequence"};
		for (int j = 0; j < 3; j++) {
			double t0 = now();
			if (call(ch, names[j], msgs[j]) != KVM_RPC_OK)
				w->errors++;
			if (w->n < MAX_SAMPLES / THREADS)
				w->lat[w->n++] = now() - t0;
		}
	}
	kvm_rpc_channel_close(ch);
	return NULL;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
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

int main(int argc, char **argv)
{
	(void)argc;
	char self[PATH_MAX], bin[PATH_MAX + 64], root[PATH_MAX];
	if (!realpath(argv[0], self)) {
		perror("realpath");
		return 1;
	}
	snprintf(bin, sizeof(bin), "%s/../bin/kvmesh-coordinator", dirname(self));
	if (!getcwd(root, sizeof(root)))
		return 1;
	char dir[] = "/tmp/kvmesh-bench-control-XXXXXX";
	if (!mkdtemp(dir))
		return 1;
	int port = 20000 + getpid() % 20000;
	snprintf(target, sizeof(target), "127.0.0.1:%d", port);
	char listen_arg[96], dir_arg[96];
	snprintf(listen_arg, sizeof(listen_arg), "--listen=%s", target);
	snprintf(dir_arg, sizeof(dir_arg), "--data-dir=%s", dir);
	char *args[] = {bin, listen_arg, dir_arg, "--dead-after=60s", NULL};
	pid_t coord;
	if (posix_spawn(&coord, bin, NULL, NULL, args, environ) != 0) {
		fprintf(stderr, "bench-control: cannot start %s\n", bin);
		return 1;
	}
	/* Wait for the port before opening a channel: a gRPC channel that fails
	 * to connect backs off for seconds. */
	for (int i = 0; i < 200; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
		sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		int ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
		close(fd);
		if (ok)
			break;
		usleep(25000);
	}
	kvm_rpc_channel *ch;
	kvm_rpc_channel_open(target, &ch);
	/* The model and three nodes with room for every cycle in flight. */
	Kvmesh__V1__BlockGeometry geo = KVMESH__V1__BLOCK_GEOMETRY__INIT;
	geo.layers = 32, geo.kv_heads = 8, geo.head_dim = 128, geo.block_tokens = 16;
	geo.dtype = KVMESH__V1__KV_DTYPE__KV_DTYPE_F16;
	Kvmesh__V1__Model model = KVMESH__V1__MODEL__INIT;
	model.id = "bench", model.q_heads = 32, model.geometry = &geo;
	int rc = KVM_RPC_UNAVAILABLE;
	for (int i = 0; i < 100 && rc != KVM_RPC_OK; i++) {
		rc = call(ch, "RegisterModel", &model.base);
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
		rc = call(ch, "RegisterNode", &req.base);
	}
	kvm_rpc_channel_close(ch);
	if (rc != KVM_RPC_OK) {
		kill(coord, SIGTERM);
		return 1;
	}

	worker w[THREADS];
	pthread_t t[THREADS];
	double start = now();
	for (int i = 0; i < THREADS; i++) {
		w[i] = (worker){.id = i, .lat = malloc(sizeof(double) * (MAX_SAMPLES / THREADS)),
				.stop_at = start + SECONDS};
		pthread_create(&t[i], NULL, run, &w[i]);
	}
	size_t total = 0;
	int errors = 0;
	for (int i = 0; i < THREADS; i++) {
		pthread_join(t[i], NULL);
		total += w[i].n;
		errors += w[i].errors;
	}
	double elapsed = now() - start;
	double *all = malloc(sizeof(double) * (total + 1));
	size_t k = 0;
	for (int i = 0; i < THREADS; i++) {
		memcpy(all + k, w[i].lat, w[i].n * sizeof(double));
		k += w[i].n;
		free(w[i].lat);
	}
	qsort(all, total, sizeof(double), cmp);
	double p50 = total ? all[total / 2] * 1e3 : 0, p99 = total ? all[total * 99 / 100] * 1e3 : 0;
	printf("bench-control: %d client threads, %.1f s, %zu calls (create+extend+release "
	       "cycles), %d errors; every change fsync'd before it is acknowledged\n",
	       THREADS, elapsed, total, errors);
	free(all);

	/* The Python client, one thread, for reference. */
	char *pargs[] = {"/usr/bin/python3", "-c", (char *)python_cycle, target, root, NULL};
	pid_t py;
	if (posix_spawn(&py, pargs[0], NULL, NULL, pargs, environ) == 0)
		waitpid(py, NULL, 0);

	kill(coord, SIGTERM);
	waitpid(coord, NULL, 0);
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "bench-control: could not remove %s\n", dir);
	printf("control_ops_per_s=%.0f\n", total / elapsed);
	printf("control_p50_ms=%.3f\n", p50);
	printf("control_p99_ms=%.3f\n", p99);
	return errors ? 1 : 0;
}
