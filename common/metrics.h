/* Prometheus metrics, and the daemons' small HTTP endpoint for them
 * (libmicrohttpd): GET /metrics in Prometheus's text format (0.0.4) and
 * GET /healthz.
 *
 * Modules keep their own counts (relaxed atomics, or state they already
 * hold) and register a collector: a function that writes them out when
 * /metrics is scraped. Nothing is kept twice, and a count costs one atomic
 * add where it happens. */
#ifndef KVMESH_COMMON_METRICS_H
#define KVMESH_COMMON_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kvm_metrics kvm_metrics;
typedef struct kvm_metrics_out kvm_metrics_out; /* where a collector writes */

/* Writes the module's metrics to out; runs on the endpoint's thread, so it
 * takes whatever locks its state needs. */
typedef void (*kvm_metrics_collector)(void *arg, kvm_metrics_out *out);

/* An empty registry; *out is the caller's (kvm_metrics_destroy). */
int kvm_metrics_create(kvm_metrics **out);

/* Adds a collector (before the endpoint starts). What arg points to must
 * be alive whenever the registry renders: stop the endpoint before
 * destroying what collectors read. */
int kvm_metrics_add(kvm_metrics *m, kvm_metrics_collector fn, void *arg);

/* Every collector's output, as /metrics sends it; malloc'd, NUL after *len
 * bytes (NULL when out of memory). */
char *kvm_metrics_render(kvm_metrics *m, size_t *len);

void kvm_metrics_destroy(kvm_metrics *m);

/* ---- The endpoint (metrics_http.c) ----------------------------------------------- */

typedef struct kvm_metrics_http kvm_metrics_http;

/* Serves GET /metrics (m's collectors) and GET /healthz on addr
 * ("host:port", "[v6]:port" or ":port" for every address; port 0 picks
 * one, returned in *port). On failure err says why (bad address, port
 * taken). *out is the caller's (kvm_metrics_http_stop). */
int kvm_metrics_http_start(kvm_metrics *m, const char *addr, int *port, kvm_metrics_http **out,
			   char *err, size_t errlen);

/* A daemon's endpoint in one step: a registry of these collectors, served
 * on addr as kvm_metrics_http_start does; a failure is logged
 * (metrics_listen_failed, with the address and why). kvm_metrics_http_stop
 * then frees the registry too. */
typedef struct kvm_metrics_source {
	kvm_metrics_collector fn;
	void *arg;
} kvm_metrics_source;
int kvm_metrics_serve(const char *addr, const kvm_metrics_source *src, size_t n, int *port,
		      kvm_metrics_http **out);

/* /healthz answers 200 "ok" while healthy, else 503; starts unhealthy. */
void kvm_metrics_http_set_healthy(kvm_metrics_http *h, bool healthy);

/* Stops serving (a scrape in progress ends first) and frees h (and the
 * registry kvm_metrics_serve made). */
void kvm_metrics_http_stop(kvm_metrics_http *h);

/* ---- Inside a collector ---------------------------------------------------------- */

/* A family's HELP and TYPE lines ("counter", "gauge", "histogram"); its
 * samples follow. */
void kvm_metrics_family(kvm_metrics_out *o, const char *name, const char *type,
			const char *help);
/* One sample: labels is preformatted (`node="a",state="used"`) or NULL. */
void kvm_metrics_sample(kvm_metrics_out *o, const char *name, const char *labels, double value);

/* A family with one unlabelled sample. */
void kvm_metrics_single(kvm_metrics_out *o, const char *name, const char *type,
			const char *help, double value);

/* Escapes a label value (\, " and newline) into dst (always NUL-terminated,
 * cut to fit). Values that come from users (node ids) go through this. */
void kvm_metrics_escape(char *dst, size_t cap, const char *value);

/* A histogram of durations in seconds, with fixed buckets from 50 us to
 * 10 s; observed lock-free from any thread. Zero-initialized is empty. */
#define KVM_HISTOGRAM_BUCKETS 16
typedef struct kvm_histogram {
	uint64_t bucket[KVM_HISTOGRAM_BUCKETS]; /* not cumulative; last: above 10 s */
	uint64_t count, sum_ns;
} kvm_histogram;

void kvm_histogram_observe(kvm_histogram *h, uint64_t ns);
/* The _bucket (cumulative, with le), _sum and _count samples of name. */
void kvm_metrics_histogram(kvm_metrics_out *o, const char *name, const char *labels,
			   const kvm_histogram *h);

#endif
