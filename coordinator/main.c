/* kvmesh-coordinator: the cluster's coordinator daemon. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <systemd/sd-daemon.h>

#include "common/auth.h"
#include "common/config.h"
#include "common/health.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/rpc.h"
#include "coordinator/coordinator.h"
#include "coordinator/state.h"

int main(int argc, char **argv)
{
	char listen[KVM_OPT_STRING_MAX], data_dir[KVM_OPT_STRING_MAX], lend[KVM_OPT_STRING_MAX];
	char token_file[KVM_OPT_STRING_MAX], token[KVM_AUTH_TOKEN_MAX + 1];
	char metrics_listen[KVM_OPT_STRING_MAX];
	int64_t heartbeat_ms, dead_after_ms;
	uint64_t snapshot_bytes;
	const kvm_option opts[] = {
		{"listen", KVM_OPT_STRING, listen, "127.0.0.1:7400", "gRPC address to serve on"},
		{"metrics-listen", KVM_OPT_STRING, metrics_listen, "",
		 "HTTP address for /metrics (Prometheus) and /healthz, e.g. :7401 (empty: off)"},
		{"data-dir", KVM_OPT_STRING, data_dir, "/var/lib/kvmesh/coordinator",
		 "directory of the embedded state store"},
		{"heartbeat", KVM_OPT_DURATION, &heartbeat_ms, "1s", "how often agents heartbeat"},
		{"dead-after", KVM_OPT_DURATION, &dead_after_ms, "3s",
		 "a node silent this long is dead"},
		{"lend-share", KVM_OPT_STRING, lend, "0.5",
		 "share (0..1) of each node's pool it lends to others"},
		{"snapshot-bytes", KVM_OPT_BYTES, &snapshot_bytes, "64MiB",
		 "snapshot the state log once it grows past this"},
		{"auth-token-file", KVM_OPT_STRING, token_file, "",
		 "file (mode 0600) with the cluster's shared token that every call must present "
		 "(empty: no authentication)"},
	};
	const size_t n_opts = sizeof(opts) / sizeof(opts[0]);
	char err[512];
	int rc = kvm_config_load(opts, n_opts, &argc, argv, err, sizeof(err));
	if (rc == KVM_CONFIG_HELP) {
		kvm_config_usage(stdout, "kvmesh-coordinator",
				 "The kvmesh coordinator: node registry, KV ledger, placement.", opts,
				 n_opts);
		return 0;
	}
	if (rc != 0) {
		fprintf(stderr, "kvmesh-coordinator: %s\n", err);
		return 2;
	}
	if (argc > 1) {
		fprintf(stderr, "kvmesh-coordinator: unexpected argument \"%s\" (see --help)\n",
			argv[1]);
		return 2;
	}
	char *end;
	double lend_share = strtod(lend, &end);
	if (*end || !(lend_share >= 0 && lend_share <= 1)) {
		fprintf(stderr, "kvmesh-coordinator: --lend-share must be a number in 0..1, not \"%s\"\n",
			lend);
		return 2;
	}

	if ((rc = kvm_auth_init("kvmesh-coordinator", token_file, token, sizeof(token), err,
				sizeof(err))) != 0) {
		fprintf(stderr, "kvmesh-coordinator: --auth-token-file: %s\n", err);
		return 2;
	}

	/* Signals are taken synchronously below; block them before any thread starts. */
	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);

	kvm_state *st;
	rc = kvm_state_open_embedded(data_dir, snapshot_bytes, &st);
	if (rc != 0) {
		kvm_log(KVM_LOG_ERROR, "state_open_failed", "dir=%s error=\"%s\"", data_dir,
			rc == -EBUSY ? "another coordinator holds this data directory"
				     : strerror(-rc));
		return 1;
	}
	kvm_state_stats ss;
	kvm_state_stats_get(st, &ss);
	kvm_log(KVM_LOG_INFO, "state_recovered", "dir=%s records=%llu torn_bytes=%llu", data_dir,
		(unsigned long long)ss.records, (unsigned long long)ss.torn_bytes);

	int port = 0;
	kvm_rpc_server *srv;
	kvm_health *health;
	kvm_coord *coord;
	rc = kvm_rpc_server_create(listen, &port, &srv);
	if (rc != 0) {
		kvm_log(KVM_LOG_ERROR, "listen_failed", "addr=%s error=\"%s\"", listen,
			strerror(-rc));
		kvm_state_close(st);
		return 1;
	}
	kvm_coord_config cfg = {.heartbeat_ms = heartbeat_ms,
				.dead_after_ms = dead_after_ms,
				.lend_share = lend_share};
	if ((rc = kvm_rpc_server_set_token(srv, token)) != 0 ||
	    (rc = kvm_health_register(srv, &health)) != 0 ||
	    (rc = kvm_coord_create(&cfg, st, srv, &coord)) != 0 ||
	    (rc = kvm_rpc_server_start(srv)) != 0) {
		kvm_log(KVM_LOG_ERROR, "start_failed", "error=\"%s\"", strerror(-rc));
		return 1;
	}
	/* /metrics reads the server and the coordinator: the endpoint stops
	 * before either goes. */
	kvm_metrics_http *http = NULL;
	int metrics_port = 0;
	const kvm_metrics_source src[] = {{kvm_rpc_server_collect, srv}, {kvm_coord_collect, coord}};
	if (metrics_listen[0] && kvm_metrics_serve(metrics_listen, src, 2, &metrics_port, &http))
		return 1;
	kvm_health_set(health, "", true);
	kvm_health_set(health, "kvmesh.v1.Coordinator", true);
	kvm_metrics_http_set_healthy(http, true);
	kvm_log(KVM_LOG_INFO, "serving",
		"addr=%s port=%d metrics_port=%d heartbeat_ms=%lld dead_after_ms=%lld auth=%s",
		listen, port, metrics_port, (long long)heartbeat_ms, (long long)dead_after_ms,
		token[0] ? "token" : "none");
	sd_notify(0, "READY=1"); /* Type=notify units start dependants now */

	int sig;
	sigwait(&sigs, &sig);
	kvm_log(KVM_LOG_INFO, "stopping", "signal=%s", strsignal(sig));
	sd_notify(0, "STOPPING=1");
	kvm_health_set(health, "", false);
	kvm_metrics_http_stop(http); /* it reads the server and the coordinator */
	kvm_rpc_server_destroy(srv, 2000);
	kvm_coord_destroy(coord);
	kvm_health_destroy(health);
	/* How well group commit batched: records written per fdatasync. */
	kvm_state_stats_get(st, &ss);
	kvm_state_close(st);
	kvm_log(KVM_LOG_INFO, "stopped", "appends=%llu syncs=%llu",
		(unsigned long long)ss.appends, (unsigned long long)ss.syncs);
	/* A store whose write or sync failed stopped us (coord_store_fail):
	 * EX_IOERR, so that systemd (Restart=on-failure) or Kubernetes start
	 * the coordinator again, from what is on disk. */
	return ss.sync_error ? 74 : 0;
}
