/* The real daemons over the RDMA data plane: a coordinator and three agents
 * (client/demo/launch.c starts them as child processes; KVMESH_BIN_DIR or the
 * program's folder holds kvmesh-coordinator and kvmesh-agent), the agents'
 * data servers on --data-host (the soft-RoCE interface's address in the guest of
 * `make test-rdma`, so that their RDMA device is the one holding it).
 *
 * Checks: every agent serves its data plane by the expected transport (Stats
 * data_server_rdma, and the log's data_server line); a sequence homed on
 * agent-1 with blocks on all three agents decodes steps, every layer, equal to
 * the local kernel over the same KV; the home reached both peers by the
 * expected transport (Stats rdma_peers, rdma_fallbacks; its peer_transport log
 * lines), so an RDMA run cannot pass by a silent TCP fallback; a killed peer
 * (SIGKILL) yields an error naming it, within the deadline.
 *
 * A plain program (it runs inside the guest's initramfs): prints
 * "N passed, N failed", exits 0 only if nothing failed.
 *
 *   test_rdma_cluster [--data-host 10.0.0.1] [--data-host3 10.0.0.2] [--expect rdma|tcp]
 *                     [--rdma auto|on|off]
 *
 * --data-host3 puts agent-3 on another address (in the guest: veth1's, so that it
 * serves on rxe1 and its traffic with agent-1 crosses the veth pair between two
 * RDMA devices; agent-1 and agent-2 share rxe0).
 * On a host without RDMA, `--expect tcp` (the default when --data-host is
 * 127.0.0.1) checks that the agents serve and dial TCP as before. */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#include "client/demo/launch.h"
#include "client/kvmesh.h"
#include "common/rpc.h"
#include "kernels/distattn.h"
#include "tests/ref_kv.h"
#include "proto/kvmesh.pb-c.h"

static int g_passed, g_failed;
static kvm_client *g_c;
static local_cluster *g_lc;

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* One check: counted, printed when it fails. */
static bool check(bool ok, const char *fmt, ...)
{
	if (ok)
		return true;
	va_list ap;
	va_start(ap, fmt);
	printf("  FAIL: ");
	vprintf(fmt, ap);
	printf("\n");
	va_end(ap);
	return false;
}

static void result(const char *name, bool ok, double t0)
{
	printf("%s %s (%.1f s)\n", ok ? "PASS" : "FAIL", name, now_s() - t0);
	fflush(stdout);
	if (ok)
		g_passed++;
	else
		g_failed++;
}

/* ---- comparing with the reference (tests/ref_kv.h) ------------------------ */

static double max_diff(const float *a, const float *b, size_t n, double *scale)
{
	double d = 0;
	*scale = 1;
	for (size_t i = 0; i < n; i++) {
		if (!isfinite(a[i]))
			return INFINITY;
		*scale = fmax(*scale, fabs(b[i]));
		d = fmax(d, fabs((double)a[i] - b[i]));
	}
	return d;
}

/* ---- the agents' Stats and logs ------------------------------------------- */

/* Counter `name` of agent i's Stats; NAN if it could not be read. */
static double agent_counter(unsigned i, const char *name)
{
	kvm_rpc_channel *ch;
	if (kvm_rpc_channel_open(local_cluster_agent_grpc(g_lc, i), &ch) != 0)
		return NAN;
	Kvmesh__V1__StatsRequest req = KVMESH__V1__STATS_REQUEST__INIT;
	uint8_t buf[16];
	size_t n = kvmesh__v1__stats_request__pack(&req, buf);
	void *resp = NULL;
	size_t len = 0;
	kvm_rpc_status st;
	int rc = kvm_rpc_unary(ch, "/kvmesh.v1.Agent/Stats", buf, n, 5000, &resp, &len, &st);
	kvm_rpc_channel_close(ch);
	double v = NAN;
	Kvmesh__V1__StatsResponse *r =
		rc == 0 && st.code == KVM_RPC_OK ? kvmesh__v1__stats_response__unpack(NULL, len, resp) : NULL;
	for (size_t k = 0; r && k < r->n_counters; k++)
		if (strcmp(r->counters[k]->key, name) == 0)
			v = r->counters[k]->value;
	if (r)
		kvmesh__v1__stats_response__free_unpacked(r, NULL);
	free(resp);
	return v;
}

/* Lines of agent i's log that hold every one of the NULL-terminated words. */
static int log_lines(unsigned i, ...)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/%s.log", local_cluster_dir(g_lc), local_cluster_agent_id(g_lc, i));
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	char line[4096];
	int n = 0;
	while (fgets(line, sizeof line, f)) {
		va_list ap;
		va_start(ap, i);
		bool all = true;
		for (const char *w; (w = va_arg(ap, const char *)) != NULL;)
			all = all && strstr(line, w);
		va_end(ap);
		n += all;
	}
	fclose(f);
	return n;
}

static void print_log(unsigned i, const char *word)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/%s.log", local_cluster_dir(g_lc), local_cluster_agent_id(g_lc, i));
	FILE *f = fopen(path, "r");
	char line[4096];
	while (f && fgets(line, sizeof line, f))
		if (!word || strstr(line, word))
			printf("  %s| %s", local_cluster_agent_id(g_lc, i), line);
	if (f)
		fclose(f);
}

static int free_port(const char *host)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET};
	inet_pton(AF_INET, host, &sa.sin_addr);
	socklen_t sl = sizeof sa;
	int port = -1;
	if (fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 &&
	    getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
		port = ntohs(sa.sin_port);
	if (fd >= 0)
		close(fd);
	return port;
}

/* Starts agent n+1 with its data server on host, and `rdma` (--rdma=...). */
static bool add_agent(const char *host, const char *rdma, const char *model)
{
	char data_flag[128], rdma_flag[64], err[4096];
	int port = free_port(host);
	snprintf(data_flag, sizeof data_flag, "--data-address=%s:%d", host, port);
	snprintf(rdma_flag, sizeof rdma_flag, "--rdma=%s", rdma);
	const char *flags[] = {data_flag, rdma_flag, "--attend-timeout=4s", "--call-timeout=10s", NULL};
	return check(port > 0, "no free port on %s", host) &&
	       check(local_cluster_add_agents(g_lc, 1, model, "512KiB", flags, err, sizeof err) == 0, "agent: %s",
		     err);
}

/* A peer that serves TCP only (--rdma=off) among RDMA agents: the home's RDMA
 * dial fails, it falls back to TCP, says so once, and decode stays right. */
static void fallback_case(const char *host, const kvm_model *m)
{
	double t0 = now_s();
	kvm_client_close(g_c);
	g_c = NULL;
	local_cluster_stop(g_lc, getenv("KVMESH_KEEP_LOGS") != NULL);
	g_lc = NULL;
	char err[4096];
	const char *coord_flags[] = {"--heartbeat=200ms", "--dead-after=3s", NULL};
	kvm_client_opts co = {.control_timeout_ms = 10000, .data_timeout_ms = 20000};
	bool ok = check(local_cluster_start(coord_flags, &g_lc, err, sizeof err) == 0, "coordinator: %s", err) &&
		  check(kvm_client_open(local_cluster_coordinator(g_lc), &co, &g_c) == 0, "client open") &&
		  check(kvm_model_register(g_c, m) == 0, "model: %s", kvm_client_error(g_c)) &&
		  add_agent(host, "on", m->id) && add_agent(host, "off", m->id);
	ref_seq r = {.m = m, .rng = 21};
	uint32_t n = 40 * 16 + 3, full = n / 16, rest = n % 16, written = 0;
	uint32_t *prompt = malloc(n * sizeof *prompt);
	for (uint32_t i = 0; i < n; i++) {
		prompt[i] = (i * 2246822519u + 5) % 50000;
		ref_append(&r);
	}
	kvm_seq_info info;
	ok = ok && check(kvm_seq_create(g_c, m->id, "fb", prompt, n, "agent-1", &info) == 0, "seq_create: %s",
			 kvm_client_error(g_c)) &&
	     check(kvm_seq_write_blocks(g_c, "fb", prompt, full, (const void *const *)r.blocks, &written) == 0,
		   "write_blocks: %s", kvm_client_error(g_c));
	for (uint32_t l = 0; ok && l < m->layers; l++)
		ok = check(kvm_append_kv(g_c, "fb", l, rest, ref_row(&r, l, full * 16, 0), ref_row(&r, l, full * 16, 1)) ==
				   0,
			   "append_kv: %s", kvm_client_error(g_c));
	ok = ok && check(agent_counter(1, "pinned_blocks") > 0, "agent-2 holds no block");
	uint32_t QD = m->q_heads * m->head_dim;
	float *q = malloc(QD * 4), *o = malloc(QD * 4), *lse = malloc(m->q_heads * 4);
	float *ro = malloc(QD * 4), *rl = malloc(m->q_heads * 4);
	uint64_t s = 5;
	for (uint32_t step = 0; ok && step < 3; step++) {
		ref_append(&r);
		for (uint32_t l = 0; ok && l < m->layers; l++) {
			for (uint32_t k = 0; k < QD; k++)
				q[k] = frand(&s);
			uint32_t pos = r.tokens - 1;
			kvm_attend a = {.seq_id = "fb", .q = q, .k_new = ref_row(&r, l, pos, 0),
					.v_new = ref_row(&r, l, pos, 1), .o = o, .lse = lse};
			ok = check(kvm_attend_append(g_c, l, 0, &a, 1) == 0, "step %u layer %u: %s", step, l,
				   kvm_client_error(g_c)) &&
			     check(ref_attend(&r, l, q, ro, rl) == 0, "reference kernel");
			double sc, sl, d = ok ? max_diff(o, ro, QD, &sc) : 0, dl = ok ? max_diff(lse, rl, m->q_heads, &sl) : 0;
			ok = ok && check(d <= 2e-3 * sc && dl <= 2e-3 * sl, "step %u layer %u: o differs by %.3g, lse by %.3g",
					 step, l, d, dl);
		}
	}
	if (ok) {
		double peers = agent_counter(0, "rdma_peers"), fb = agent_counter(0, "rdma_fallbacks");
		int lines = log_lines(0, "peer_rdma_fallback", "peer=agent-2", NULL);
		print_log(0, "peer_");
		print_log(1, "data_server");
		ok = check(log_lines(1, "data_server", "transport=tcp", NULL) == 1, "agent-2 does not serve TCP") &&
		     check(peers == 0 && fb == 1, "agent-1: rdma_peers %g, rdma_fallbacks %g (want 0, 1)", peers, fb) &&
		     check(lines == 1, "agent-1 logged the fallback %d times, not once", lines);
	}
	if (!ok) {
		print_log(0, NULL);
		print_log(1, NULL);
	}
	result("a TCP-only peer: the home falls back to TCP, logs it once, decode stays right", ok, t0);
	free(q), free(o), free(lse), free(ro), free(rl), free(prompt);
	ref_free(&r);
}

int main(int argc, char **argv)
{
	const char *data_host = "127.0.0.1", *data_host3 = NULL, *expect = NULL, *rdma = "auto";
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--data-host") && i + 1 < argc)
			data_host = argv[++i];
		else if (!strcmp(argv[i], "--data-host3") && i + 1 < argc)
			data_host3 = argv[++i];
		else if (!strcmp(argv[i], "--expect") && i + 1 < argc)
			expect = argv[++i];
		else if (!strcmp(argv[i], "--rdma") && i + 1 < argc)
			rdma = argv[++i];
		else if (!strcmp(argv[i], "--dev") || !strcmp(argv[i], "--netdev") || !strcmp(argv[i], "--tag"))
			i++; /* the guest's runner passes these to every test */
		else {
			fprintf(stderr, "usage: %s [--data-host IP] [--data-host3 IP] [--expect rdma|tcp] [--rdma auto|on|off]\n",
				argv[0]);
			return 2;
		}
	}
	if (!expect)
		expect = strcmp(data_host, "127.0.0.1") ? "rdma" : "tcp";
	bool want_rdma = strcmp(expect, "rdma") == 0;
	printf("cluster over the data plane: data host %s, --rdma=%s, expecting %s\n", data_host, rdma, expect);
	fflush(stdout);

	/* ---- start: a coordinator and three agents on data_host ---- */
	double t0 = now_s();
	char err[4096];
	kvm_model m = {.id = "rdma16", .layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64,
		       .block_tokens = 16, .dtype = KVM_F16}; /* blocks of 16 KiB */
	const char *coord_flags[] = {"--heartbeat=200ms", "--dead-after=3s", NULL};
	bool ok = check(local_cluster_start(coord_flags, &g_lc, err, sizeof err) == 0, "coordinator: %s", err);
	kvm_client_opts co = {.control_timeout_ms = 10000, .data_timeout_ms = 20000};
	ok = ok && check(kvm_client_open(local_cluster_coordinator(g_lc), &co, &g_c) == 0, "client open");
	ok = ok && check(kvm_model_register(g_c, &m) == 0, "model: %s", g_c ? kvm_client_error(g_c) : "");
	char rdma_flag[64];
	snprintf(rdma_flag, sizeof rdma_flag, "--rdma=%s", rdma);
	for (unsigned i = 0; ok && i < 3; i++) {
		char data_flag[128];
		const char *h = i == 2 && data_host3 ? data_host3 : data_host;
		int port = free_port(h);
		snprintf(data_flag, sizeof data_flag, "--data-address=%s:%d", h, port);
		/* 32 slots each, a share of them lendable: a 52-block sequence needs all three. */
		const char *agent_flags[] = {data_flag, rdma_flag, "--attend-timeout=4s", "--call-timeout=10s",
					     NULL};
		ok = check(port > 0, "no free port on %s", h) &&
		     check(local_cluster_add_agents(g_lc, 1, m.id, "512KiB", agent_flags, err, sizeof err) == 0,
			   "agent %u: %s", i + 1, err);
	}
	for (unsigned i = 0; ok && i < 3; i++) {
		double v = agent_counter(i, "data_server_rdma");
		ok = check(v == (want_rdma ? 1.0 : 0.0), "%s: data_server_rdma = %g", local_cluster_agent_id(g_lc, i), v) &&
		     check(log_lines(i, "data_server", want_rdma ? "transport=rdma" : "transport=tcp", NULL) == 1,
			   "%s: no data_server transport=%s line in its log", local_cluster_agent_id(g_lc, i), expect);
		if (!ok)
			print_log(i, NULL);
	}
	result("three agents serve the data plane by the expected transport", ok, t0);
	if (!ok)
		goto out;
	for (unsigned i = 0; i < 3; i++)
		print_log(i, "data_server");

	/* ---- a sequence over three agents, decoded and checked ---- */
	t0 = now_s();
	ref_seq r = {.m = &m, .rng = 7};
	uint32_t n = 52 * 16 - 5;
	uint32_t *prompt = malloc(n * sizeof *prompt);
	for (uint32_t i = 0; i < n; i++) {
		prompt[i] = (i * 2654435761u + 1) % 50000;
		ref_append(&r);
	}
	kvm_seq_info info;
	ok = check(kvm_seq_create(g_c, m.id, "wide", prompt, n, "agent-1", &info) == 0, "seq_create: %s",
		   kvm_client_error(g_c));
	uint32_t full = n / 16, rest = n % 16, written = 0;
	ok = ok && check(kvm_seq_write_blocks(g_c, "wide", prompt, full, (const void *const *)r.blocks, &written) == 0,
			 "write_blocks: %s", kvm_client_error(g_c));
	for (uint32_t l = 0; ok && l < m.layers; l++)
		ok = check(kvm_append_kv(g_c, "wide", l, rest, ref_row(&r, l, full * 16, 0),
					 ref_row(&r, l, full * 16, 1)) == 0,
			   "append_kv: %s", kvm_client_error(g_c));
	double pinned[3];
	for (unsigned i = 0; ok && i < 3; i++) {
		pinned[i] = agent_counter(i, "pinned_blocks");
		ok = check(pinned[i] > 0, "%s holds no block of the sequence (pinned_blocks %g)",
			   local_cluster_agent_id(g_lc, i), pinned[i]);
	}
	if (ok)
		printf("  blocks pinned: agent-1 %g, agent-2 %g, agent-3 %g\n", pinned[0], pinned[1], pinned[2]);
	uint32_t QD = m.q_heads * m.head_dim;
	float *q = malloc(QD * 4), *o = malloc(QD * 4), *lse = malloc(m.q_heads * 4);
	float *ro = malloc(QD * 4), *rl = malloc(m.q_heads * 4);
	uint64_t s = 99;
	double worst = 0;
	const uint32_t steps = 6; /* 827 + 6 tokens crosses a block boundary: a seal */
	for (uint32_t step = 0; ok && step < steps; step++) {
		ref_append(&r);
		for (uint32_t l = 0; ok && l < m.layers; l++) {
			for (uint32_t k = 0; k < QD; k++)
				q[k] = frand(&s);
			uint32_t pos = r.tokens - 1;
			kvm_attend a = {.seq_id = "wide", .q = q, .k_new = ref_row(&r, l, pos, 0),
					.v_new = ref_row(&r, l, pos, 1), .o = o, .lse = lse};
			ok = check(kvm_attend_append(g_c, l, 0, &a, 1) == 0, "step %u layer %u: %s", step, l,
				   kvm_client_error(g_c)) &&
			     check(ref_attend(&r, l, q, ro, rl) == 0, "reference kernel");
			double sc, sl, d = ok ? max_diff(o, ro, QD, &sc) : 0, dl = ok ? max_diff(lse, rl, m.q_heads, &sl) : 0;
			ok = ok && check(d <= 2e-3 * sc && dl <= 2e-3 * sl,
					 "step %u layer %u: o differs by %.3g, lse by %.3g", step, l, d, dl);
			worst = fmax(worst, fmax(d / sc, dl / sl));
		}
	}
	if (ok)
		printf("  %u steps x %u layers equal to the local kernel (worst relative difference %.2g)\n", steps,
		       m.layers, worst);
	result("decode over three agents equals the local kernel", ok, t0);

	/* ---- the home reached its peers by the expected transport ---- */
	t0 = now_s();
	bool ok2 = ok;
	if (ok2) {
		double peers = agent_counter(0, "rdma_peers"), fb = agent_counter(0, "rdma_fallbacks");
		int lines = log_lines(0, "peer_transport", "transport=rdma", NULL);
		int fb_lines = log_lines(0, "peer_rdma_fallback", NULL);
		printf("  agent-1: rdma_peers %g, rdma_fallbacks %g, peer_transport rdma lines %d\n", peers, fb, lines);
		print_log(0, "peer_");
		if (want_rdma)
			ok2 = check(peers == 2, "agent-1 has %g peers over RDMA, not 2", peers) &&
			      check(fb == 0 && fb_lines == 0, "agent-1 fell back to TCP %g times", fb) &&
			      check(lines == 2, "agent-1 logged %d RDMA peer connections, not 2", lines);
		else
			ok2 = check(peers == 0 && lines == 0, "agent-1 has %g peers over RDMA on a TCP run", peers);
		if (!ok2)
			print_log(0, NULL);
	}
	result(want_rdma ? "the home reached both peers over RDMA (no TCP fallback)"
			 : "the home reached both peers over TCP",
	       ok2, t0);

	/* ---- a killed peer is named ---- */
	t0 = now_s();
	bool ok3 = ok;
	if (ok3) {
		local_cluster_signal_agent(g_lc, 2, SIGKILL); /* agent-3 */
		usleep(100000);
		ref_append(&r);
		for (uint32_t k = 0; k < QD; k++)
			q[k] = frand(&s);
		kvm_attend a = {.seq_id = "wide", .q = q, .k_new = ref_row(&r, 0, r.tokens - 1, 0),
				.v_new = ref_row(&r, 0, r.tokens - 1, 1), .o = o, .lse = lse};
		double t1 = now_s();
		int rc = kvm_attend_append(g_c, 0, 0, &a, 1);
		double took = now_s() - t1;
		const char *msg = kvm_client_error(g_c);
		printf("  after SIGKILL of agent-3: rc %d in %.2f s: %s\n", rc, took, msg);
		ok3 = check(rc != 0 && a.status != 0, "a decode step over a dead peer succeeded") &&
		      check(strstr(msg, "agent-3") && strstr(msg, "blocks"), "the error does not name the peer: %s",
			    msg) &&
		      check(took < 15.0, "the failure took %.1f s", took);
		/* The home itself saw the peer fail on its data-plane connection. */
		int seen = 0;
		for (int w = 0; w < 50 && !seen; w++, usleep(100000))
			seen = log_lines(0, "attend_peer_failed", "peer=agent-3", NULL);
		print_log(0, "attend_peer_failed");
		ok3 = ok3 && check(seen > 0, "agent-1 logged no attend_peer_failed for agent-3");
	}
	result("a killed peer gives an error naming it", ok3, t0);
	free(q), free(o), free(lse), free(ro), free(rl), free(prompt);
	ref_free(&r);
	if (want_rdma)
		fallback_case(data_host, &m);
out:
	kvm_client_close(g_c);
	g_c = NULL;
	if (g_lc)
		local_cluster_stop(g_lc, getenv("KVMESH_KEEP_LOGS") != NULL);
	printf("%d passed, %d failed\n", g_passed, g_failed);
	return g_failed ? 1 : 0;
}
