/* A local kvmesh cluster for the demo and the benchmarks: a coordinator and
 * agents started as child processes on loopback ports, with an embedded
 * store in a temporary data directory. Each daemon logs to a file there; a
 * daemon that fails to start has its log tail in the error message. */
#ifndef KVMESH_CLIENT_DEMO_LAUNCH_H
#define KVMESH_CLIENT_DEMO_LAUNCH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define LC_MAX_AGENTS 16

typedef struct local_cluster local_cluster;

/* Starts a coordinator (the binaries are found next to the running program).
 * extra_flags: NULL or a NULL-terminated list of "--flag=value" for it. With
 * "--auth-token-file=PATH" among them, the launcher's own readiness calls
 * present that token (give the agents the same flag).
 * *out is the caller's: local_cluster_stop. */
int local_cluster_start(const char *const *extra_flags, local_cluster **out, char *err, size_t err_len);

/* "127.0.0.1:PORT" of the coordinator. */
const char *local_cluster_coordinator(const local_cluster *lc);
/* The token of the coordinator's --auth-token-file ("" without one). */
const char *local_cluster_token(const local_cluster *lc);

/* Starts n agents for model_id (already registered), each with host_pool
 * bytes of block memory, named agent-1..agent-n (continuing the numbering on
 * later calls), and waits until the coordinator lists them ready.
 * extra_flags as above, for every agent. */
int local_cluster_add_agents(local_cluster *lc, unsigned n, const char *model_id, const char *host_pool,
			     const char *const *extra_flags, char *err, size_t err_len);

/* Kills the coordinator (SIGKILL) and starts it again with the same data
 * directory and port; waits until it answers. */
int local_cluster_restart_coordinator(local_cluster *lc, char *err, size_t err_len);
/* Kills agent i (SIGKILL, if running) and starts it again, same flags; does
 * not wait for it to register. */
int local_cluster_restart_agent(local_cluster *lc, unsigned i, char *err, size_t err_len);

unsigned local_cluster_agents(const local_cluster *lc);
const char *local_cluster_agent_id(const local_cluster *lc, unsigned i);
const char *local_cluster_agent_grpc(const local_cluster *lc, unsigned i);
/* "127.0.0.1:PORT" of agent i's data plane. */
const char *local_cluster_agent_data(const local_cluster *lc, unsigned i);
pid_t local_cluster_agent_pid(const local_cluster *lc, unsigned i);
/* Sends sig to agent i and, for SIGKILL, SIGSTOP and SIGCONT, returns only
 * once it took effect (the agent is dead, stopped, running again). */
int local_cluster_signal_agent(local_cluster *lc, unsigned i, int sig);
/* Waits up to timeout_ms for agent i to exit (it stays waitable): its exit
 * status, 128 + the signal that killed it, or -ETIMEDOUT. */
int local_cluster_wait_agent(local_cluster *lc, unsigned i, int timeout_ms);
/* The temporary directory (daemon logs, the coordinator's store). */
const char *local_cluster_dir(const local_cluster *lc);

/* Stops every daemon (SIGTERM, then SIGKILL after 5 s), removes the
 * directory unless keep_dir, frees lc. */
void local_cluster_stop(local_cluster *lc, int keep_dir);

#endif
