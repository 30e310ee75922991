/* A local kvmesh cluster as child processes: see launch.h. */
#include "client/demo/launch.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdbool.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "client/demo/nodes.h"
#include "common/auth.h"

#define MAX_ARGS 40
#define ARG_MAX_LEN 512

typedef struct daemon_proc {
	char name[32];
	char grpc[64];
	char data[64]; /* agents: the data-plane address */
	const char *prog;
	char args[MAX_ARGS][ARG_MAX_LEN]; /* kept, to start it again */
	int n_args;
	pid_t pid;
	int port_tries; /* starts again on other ports after losing one */
} daemon_proc;

struct local_cluster {
	char dir[PATH_MAX];
	char bin_dir[PATH_MAX];
	daemon_proc coord;
	daemon_proc agents[LC_MAX_AGENTS];
	unsigned n_agents;
	char token[KVM_AUTH_TOKEN_MAX + 1]; /* the coordinator's, for readiness calls */
};

/* Whether port is free to listen on at 127.0.0.1 now. */
static bool port_free(int port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return false;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				.sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	bool ok = bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
	close(fd);
	return ok;
}

/* A port for a daemon to listen on. It is picked below the kernel's
 * ephemeral range: a port from that range can be taken as the source port of
 * any outgoing connection (the agents dial their coordinator and each other)
 * between this check and the daemon's bind, and a restarted daemon binds its
 * old port again. Random, so that clusters started at once rarely pick the
 * same one; a daemon that still loses its port is started again on another. */
static int free_port(void)
{
	static unsigned seed;
	if (!seed)
		seed = (unsigned)getpid() ^ (unsigned)time(NULL);
	int low = 32768;
	FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
	if (f) {
		if (fscanf(f, "%d", &low) != 1)
			low = 32768;
		fclose(f);
	}
	int from = low - 12000 > 1024 ? low - 12000 : 1024;
	for (int tries = 0; low - from > 100 && tries < 200; tries++) {
		int port = from + (int)(rand_r(&seed) % (unsigned)(low - from));
		if (port_free(port))
			return port;
	}
	/* No room below the range: let the kernel pick one. */
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(a);
	int port = -EADDRNOTAVAIL;
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
		port = ntohs(a.sin_port);
	close(fd);
	return port;
}

/* The last lines of a daemon's log, for error messages. */
static void log_tail(const local_cluster *lc, const char *name, char *out, size_t cap)
{
	char path[PATH_MAX + 64];
	snprintf(path, sizeof(path), "%s/%s.log", lc->dir, name);
	out[0] = '\0';
	FILE *f = fopen(path, "r");
	if (!f)
		return;
	fseek(f, 0, SEEK_END);
	long size = ftell(f);
	long from = size > (long)cap - 1 ? size - (long)cap + 1 : 0;
	fseek(f, from, SEEK_SET);
	size_t n = fread(out, 1, cap - 1, f);
	out[n] = '\0';
	fclose(f);
}

static void add_arg(daemon_proc *d, const char *a)
{
	if (d->n_args < MAX_ARGS - 1) {
		size_t n = strlen(a);
		if (n > ARG_MAX_LEN - 1)
			n = ARG_MAX_LEN - 1;
		memcpy(d->args[d->n_args], a, n);
		d->args[d->n_args++][n] = '\0';
	}
}

/* Replaces the argument that starts with prefix (adds it if missing). */
static void set_arg(daemon_proc *d, const char *prefix, const char *value)
{
	char a[ARG_MAX_LEN];
	snprintf(a, sizeof(a), "%s%s", prefix, value);
	for (int i = 0; i < d->n_args; i++)
		if (strncmp(d->args[i], prefix, strlen(prefix)) == 0) {
			snprintf(d->args[i], ARG_MAX_LEN, "%s", a);
			return;
		}
	add_arg(d, a);
}

/* New free ports for an agent's gRPC and data servers. */
static int agent_ports(daemon_proc *d)
{
	int gport = free_port(), dport = free_port();
	for (int i = 0; dport == gport && i < 10; i++)
		dport = free_port();
	if (gport < 0 || dport < 0)
		return gport < 0 ? gport : dport;
	snprintf(d->grpc, sizeof(d->grpc), "127.0.0.1:%d", gport);
	set_arg(d, "--listen=", d->grpc);
	snprintf(d->data, sizeof(d->data), "127.0.0.1:%d", dport);
	set_arg(d, "--data-address=", d->data);
	return 0;
}

static int spawn(local_cluster *lc, daemon_proc *d)
{
	char path[PATH_MAX + 64], logp[PATH_MAX + 64];
	char *args[MAX_ARGS + 1];
	args[0] = (char *)d->prog;
	for (int i = 0; i < d->n_args; i++)
		args[i + 1] = d->args[i];
	args[d->n_args + 1] = NULL;
	snprintf(path, sizeof(path), "%s/%s", lc->bin_dir, d->prog);
	snprintf(logp, sizeof(logp), "%s/%s.log", lc->dir, d->name);
	int fd = open(logp, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (fd < 0)
		return -errno;
	pid_t pid = fork();
	if (pid < 0) {
		close(fd);
		return -errno;
	}
	if (pid == 0) {
		/* A cluster never outlives the program that started it, even one
		 * that crashed. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		dup2(fd, 1);
		dup2(fd, 2);
		int nul = open("/dev/null", O_RDONLY);
		if (nul >= 0)
			dup2(nul, 0);
		execv(path, args);
		fprintf(stderr, "exec %s: %s\n", path, strerror(errno));
		_exit(127);
	}
	close(fd);
	d->pid = pid;
	return 0;
}

/* Whether the daemon's own log says it serves: a free port picked here may
 * be taken by another process before the daemon binds it, and then whoever
 * answers on it is not ours. */
static bool log_says_serving(const local_cluster *lc, const char *name)
{
	char path[PATH_MAX + 64], line[2048];
	snprintf(path, sizeof(path), "%s/%s.log", lc->dir, name);
	FILE *f = fopen(path, "r");
	bool yes = false;
	while (f && !yes && fgets(line, sizeof(line), f))
		yes = strstr(line, "event=serving") != NULL;
	if (f)
		fclose(f);
	return yes;
}

static bool alive(pid_t pid)
{
	return pid > 0 && waitpid(pid, NULL, WNOHANG) == 0;
}

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Ready nodes the coordinator lists (negative errno if it does not answer). */
static int ready_nodes(const local_cluster *lc)
{
	demo_node nodes[LC_MAX_AGENTS + 16];
	int n = demo_list_nodes(lc->coord.grpc, lc->token, false, nodes, LC_MAX_AGENTS + 16);
	int ready = 0;
	for (int i = 0; i < n && i < LC_MAX_AGENTS + 16; i++)
		ready += nodes[i].ready;
	return n < 0 ? n : ready;
}

int local_cluster_start(const char *const *extra, local_cluster **out, char *err, size_t err_len)
{
	local_cluster *lc = calloc(1, sizeof(*lc));
	if (!lc)
		return -ENOMEM;
	ssize_t n = readlink("/proc/self/exe", lc->bin_dir, sizeof(lc->bin_dir) - 1);
	char *slash = n > 0 ? strrchr(lc->bin_dir, '/') : NULL;
	if (!slash) {
		free(lc);
		snprintf(err, err_len, "cannot find the directory of this program");
		return -ENOENT;
	}
	*slash = '\0';
	/* The daemons are next to this program (build/bin), or, for benchmarks
	 * and tests (build/bench, build/tests/unit), in build/bin; KVMESH_BIN_DIR
	 * overrides. */
	const char *env = getenv("KVMESH_BIN_DIR");
	const char *cands[] = {env, ".", "../bin", "../../bin"};
	char exe_dir[PATH_MAX];
	snprintf(exe_dir, sizeof(exe_dir), "%s", lc->bin_dir);
	bool found = false;
	for (size_t i = 0; i < sizeof(cands) / sizeof(cands[0]) && !found; i++) {
		if (!cands[i] || !*cands[i])
			continue;
		char dir[PATH_MAX], probe[PATH_MAX + 32];
		if (cands[i][0] == '/')
			snprintf(dir, sizeof(dir), "%s", cands[i]);
		else
			snprintf(dir, sizeof(dir), "%.*s/%s", PATH_MAX - 16, exe_dir, cands[i]);
		snprintf(probe, sizeof(probe), "%s/kvmesh-coordinator", dir);
		if (access(probe, X_OK) == 0) {
			snprintf(lc->bin_dir, sizeof(lc->bin_dir), "%s", dir);
			found = true;
		}
	}
	if (!found) {
		snprintf(err, err_len, "kvmesh-coordinator is not next to %s (build it, or set KVMESH_BIN_DIR)", exe_dir);
		free(lc);
		return -ENOENT;
	}
	const char *tmp = getenv("TMPDIR");
	snprintf(lc->dir, sizeof(lc->dir), "%s/kvmesh-demo-XXXXXX", tmp && *tmp ? tmp : "/tmp");
	if (!mkdtemp(lc->dir)) {
		int e = errno;
		snprintf(err, err_len, "mkdtemp %s: %s", lc->dir, strerror(e));
		free(lc);
		return -e;
	}
	static const char token_flag[] = "--auth-token-file=";
	for (int i = 0; extra && extra[i]; i++) {
		if (strncmp(extra[i], token_flag, sizeof(token_flag) - 1) != 0)
			continue;
		char msg[1024];
		int trc = kvm_auth_load_token(extra[i] + sizeof(token_flag) - 1, lc->token,
					      sizeof(lc->token), msg, sizeof(msg));
		if (trc) {
			snprintf(err, err_len, "%s", msg);
			local_cluster_stop(lc, 0);
			return trc;
		}
	}
	/* A port taken meanwhile by someone else makes the coordinator exit;
	 * then try another. */
	int rc = -EADDRINUSE;
	for (int attempt = 0; attempt < 5 && rc == -EADDRINUSE; attempt++) {
		int port = free_port();
		if (port < 0) {
			free(lc);
			return port;
		}
		snprintf(lc->coord.name, sizeof(lc->coord.name), "coordinator");
		snprintf(lc->coord.grpc, sizeof(lc->coord.grpc), "127.0.0.1:%d", port);
		char flag[PATH_MAX + 32];
		lc->coord.prog = "kvmesh-coordinator";
		lc->coord.n_args = 0;
		snprintf(flag, sizeof(flag), "--listen=%s", lc->coord.grpc);
		add_arg(&lc->coord, flag);
		snprintf(flag, sizeof(flag), "--data-dir=%s/coordinator", lc->dir);
		add_arg(&lc->coord, flag);
		for (int i = 0; extra && extra[i]; i++)
			add_arg(&lc->coord, extra[i]);
		if ((rc = spawn(lc, &lc->coord)) != 0) {
			snprintf(err, err_len, "cannot start the coordinator: %s", strerror(-rc));
			local_cluster_stop(lc, 0);
			return rc;
		}
		for (double until = now_s() + 15;;) {
			if (log_says_serving(lc, "coordinator") && ready_nodes(lc) >= 0) {
				rc = 0;
				break;
			}
			if (!alive(lc->coord.pid)) {
				lc->coord.pid = 0;
				rc = -EADDRINUSE; /* most likely; the log says */
				break;
			}
			if (now_s() > until) {
				rc = -ETIMEDOUT;
				break;
			}
			usleep(20000);
		}
	}
	if (rc != 0) {
		char tail[1024];
		log_tail(lc, "coordinator", tail, sizeof(tail));
		snprintf(err, err_len, "the coordinator did not start; its log ends:\n%s", tail);
		local_cluster_stop(lc, 1);
		return rc;
	}
	*out = lc;
	return 0;
}

int local_cluster_add_agents(local_cluster *lc, unsigned n, const char *model_id, const char *host_pool,
			     const char *const *extra, char *err, size_t err_len)
{
	if (lc->n_agents + n > LC_MAX_AGENTS) {
		snprintf(err, err_len, "at most %d agents", LC_MAX_AGENTS);
		return -EINVAL;
	}
	int before = ready_nodes(lc);
	if (before < 0)
		before = 0;
	for (unsigned k = 0; k < n; k++) {
		daemon_proc *d = &lc->agents[lc->n_agents];
		snprintf(d->name, sizeof(d->name), "agent-%u", lc->n_agents + 1);
		char flag[256];
		d->prog = "kvmesh-agent";
		d->n_args = 0;
		d->port_tries = 0;
		snprintf(flag, sizeof(flag), "--node-id=%s", d->name);
		add_arg(d, flag);
		snprintf(flag, sizeof(flag), "--coordinator=%s", lc->coord.grpc);
		add_arg(d, flag);
		int rc = agent_ports(d);
		if (rc)
			return rc;
		snprintf(flag, sizeof(flag), "--model=%.200s", model_id);
		add_arg(d, flag);
		snprintf(flag, sizeof(flag), "--host-pool=%.200s", host_pool);
		add_arg(d, flag);
		/* The whole cluster stops together: no drain first (extra may
		 * ask for one). */
		add_arg(d, "--drain-timeout=0");
		for (int i = 0; extra && extra[i]; i++)
			add_arg(d, extra[i]);
		if ((rc = spawn(lc, d)) != 0) {
			snprintf(err, err_len, "cannot start %s: %s", d->name, strerror(-rc));
			return rc;
		}
		lc->n_agents++;
	}
	for (double until = now_s() + 20;;) {
		int ready = ready_nodes(lc);
		if (ready >= before + (int)n)
			return 0;
		for (unsigned i = 0; i < lc->n_agents; i++) {
			daemon_proc *d = &lc->agents[i];
			char tail[1024];
			if (!alive(d->pid)) {
				log_tail(lc, d->name, tail, sizeof(tail));
				/* A port taken between our check and its bind. */
				if (strstr(tail, "Address already in use") && d->port_tries++ < 5 &&
				    agent_ports(d) == 0 && spawn(lc, d) == 0)
					continue;
			} else if (now_s() <= until) {
				continue;
			}
			log_tail(lc, d->name, tail, sizeof(tail));
			snprintf(err, err_len, "%s did not become ready; its log ends:\n%s", d->name, tail);
			return -ETIMEDOUT;
		}
		usleep(50000);
	}
}

int local_cluster_restart_coordinator(local_cluster *lc, char *err, size_t err_len)
{
	if (lc->coord.pid > 0) {
		kill(lc->coord.pid, SIGKILL);
		waitpid(lc->coord.pid, NULL, 0);
	}
	int rc = spawn(lc, &lc->coord);
	if (rc) {
		snprintf(err, err_len, "cannot start the coordinator again: %s", strerror(-rc));
		return rc;
	}
	for (double until = now_s() + 15; ready_nodes(lc) < 0;) {
		if (!alive(lc->coord.pid) || now_s() > until) {
			char tail[1024];
			log_tail(lc, "coordinator", tail, sizeof(tail));
			snprintf(err, err_len, "the coordinator did not start again; its log ends:\n%s", tail);
			return -ETIMEDOUT;
		}
		usleep(20000);
	}
	return 0;
}

int local_cluster_restart_agent(local_cluster *lc, unsigned i, char *err, size_t err_len)
{
	if (i >= lc->n_agents)
		return -EINVAL;
	daemon_proc *d = &lc->agents[i];
	if (d->pid > 0) {
		kill(d->pid, SIGKILL);
		waitpid(d->pid, NULL, 0);
	}
	int rc = spawn(lc, d);
	if (rc)
		snprintf(err, err_len, "cannot start %s again: %s", d->name, strerror(-rc));
	return rc;
}

const char *local_cluster_coordinator(const local_cluster *lc)
{
	return lc->coord.grpc;
}

const char *local_cluster_token(const local_cluster *lc)
{
	return lc->token;
}

unsigned local_cluster_agents(const local_cluster *lc)
{
	return lc->n_agents;
}

const char *local_cluster_agent_id(const local_cluster *lc, unsigned i)
{
	return i < lc->n_agents ? lc->agents[i].name : "";
}

const char *local_cluster_agent_grpc(const local_cluster *lc, unsigned i)
{
	return i < lc->n_agents ? lc->agents[i].grpc : "";
}

const char *local_cluster_agent_data(const local_cluster *lc, unsigned i)
{
	return i < lc->n_agents ? lc->agents[i].data : "";
}

pid_t local_cluster_agent_pid(const local_cluster *lc, unsigned i)
{
	return i < lc->n_agents ? lc->agents[i].pid : -1;
}

int local_cluster_signal_agent(local_cluster *lc, unsigned i, int sig)
{
	if (i >= lc->n_agents || lc->agents[i].pid <= 0)
		return -EINVAL;
	pid_t pid = lc->agents[i].pid;
	if (kill(pid, sig) != 0)
		return -errno;
	/* kill() returns before the signal acts: a stop takes effect when one
	 * of the process's threads is next scheduled, and meanwhile another
	 * thread can still answer a request. WNOWAIT leaves the state to
	 * whoever waits for the child later. */
	int how = sig == SIGKILL ? WEXITED : sig == SIGSTOP ? WSTOPPED : sig == SIGCONT ? WCONTINUED : 0;
	if (!how)
		return 0;
	siginfo_t si;
	while (waitid(P_PID, (id_t)pid, &si, how | WNOWAIT) != 0)
		if (errno != EINTR)
			return -errno;
	return 0;
}

int local_cluster_wait_agent(local_cluster *lc, unsigned i, int timeout_ms)
{
	if (i >= lc->n_agents || lc->agents[i].pid <= 0)
		return -EINVAL;
	for (double until = now_s() + timeout_ms / 1000.0;;) {
		siginfo_t si = {0};
		if (waitid(P_PID, (id_t)lc->agents[i].pid, &si, WEXITED | WNOHANG | WNOWAIT) != 0)
			return -errno;
		if (si.si_pid == lc->agents[i].pid)
			return si.si_code == CLD_EXITED ? si.si_status : 128 + si.si_status;
		if (now_s() > until)
			return -ETIMEDOUT;
		usleep(20000);
	}
}

const char *local_cluster_dir(const local_cluster *lc)
{
	return lc->dir;
}

static void stop_proc(daemon_proc *d)
{
	if (d->pid <= 0)
		return;
	kill(d->pid, SIGTERM);
	kill(d->pid, SIGCONT); /* a stopped one takes the SIGTERM now */
	for (int i = 0; i < 500; i++) {
		if (waitpid(d->pid, NULL, WNOHANG) != 0) {
			d->pid = 0;
			return;
		}
		usleep(10000);
	}
	kill(d->pid, SIGKILL);
	waitpid(d->pid, NULL, 0);
	d->pid = 0;
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path) == 0 ? 0 : -1;
}

static void remove_tree(const char *dir)
{
	if (nftw(dir, remove_one, 16, FTW_DEPTH | FTW_PHYS) != 0)
		fprintf(stderr, "could not remove %s: %s\n", dir, strerror(errno));
}

void local_cluster_stop(local_cluster *lc, int keep_dir)
{
	if (!lc)
		return;
	for (unsigned i = lc->n_agents; i-- > 0;)
		stop_proc(&lc->agents[i]);
	stop_proc(&lc->coord);
	if (!keep_dir && lc->dir[0])
		remove_tree(lc->dir);
	free(lc);
}
