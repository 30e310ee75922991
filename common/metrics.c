/* Prometheus metrics: collectors write text into a memory stream when
 * /metrics is scraped (the endpoint is metrics_http.c). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/metrics.h"

#define MAX_COLLECTORS 16

struct kvm_metrics_out {
	FILE *f;
};

struct kvm_metrics {
	struct {
		kvm_metrics_collector fn;
		void *arg;
	} collectors[MAX_COLLECTORS];
	size_t n;
};

int kvm_metrics_create(kvm_metrics **out)
{
	*out = calloc(1, sizeof(**out));
	return *out ? 0 : -ENOMEM;
}

int kvm_metrics_add(kvm_metrics *m, kvm_metrics_collector fn, void *arg)
{
	if (!m || !fn)
		return -EINVAL;
	if (m->n == MAX_COLLECTORS)
		return -ENOSPC;
	m->collectors[m->n].fn = fn;
	m->collectors[m->n++].arg = arg;
	return 0;
}

char *kvm_metrics_render(kvm_metrics *m, size_t *len)
{
	char *buf = NULL;
	size_t n = 0;
	kvm_metrics_out o = {.f = open_memstream(&buf, &n)};
	if (!o.f)
		return NULL;
	for (size_t i = 0; i < m->n; i++)
		m->collectors[i].fn(m->collectors[i].arg, &o);
	if (fclose(o.f) != 0) {
		free(buf);
		return NULL;
	}
	*len = n;
	return buf;
}

/* ---- Writing ----------------------------------------------------------------------- */

void kvm_metrics_family(kvm_metrics_out *o, const char *name, const char *type,
			const char *help)
{
	fprintf(o->f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void put_value(FILE *f, double v)
{
	if (isnan(v))
		fputs("NaN", f);
	else if (isinf(v))
		fputs(v > 0 ? "+Inf" : "-Inf", f);
	else if (v == (double)(int64_t)v && fabs(v) < 9e15)
		fprintf(f, "%lld", (long long)v); /* counts print as integers */
	else
		fprintf(f, "%.9g", v);
}

void kvm_metrics_sample(kvm_metrics_out *o, const char *name, const char *labels, double value)
{
	if (labels && labels[0])
		fprintf(o->f, "%s{%s} ", name, labels);
	else
		fprintf(o->f, "%s ", name);
	put_value(o->f, value);
	fputc('\n', o->f);
}

void kvm_metrics_single(kvm_metrics_out *o, const char *name, const char *type,
			const char *help, double value)
{
	kvm_metrics_family(o, name, type, help);
	kvm_metrics_sample(o, name, NULL, value);
}

void kvm_metrics_escape(char *dst, size_t cap, const char *value)
{
	size_t n = 0;
	for (const char *p = value; *p && n + 3 < cap; p++) {
		if (*p == '\\' || *p == '"') {
			dst[n++] = '\\';
			dst[n++] = *p;
		} else if (*p == '\n') {
			dst[n++] = '\\';
			dst[n++] = 'n';
		} else {
			dst[n++] = *p;
		}
	}
	if (cap)
		dst[n < cap ? n : cap - 1] = '\0';
}

/* Upper bounds in seconds; the last bucket is everything above. */
static const double bucket_le[KVM_HISTOGRAM_BUCKETS - 1] = {
	0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
	0.025,   0.05,   0.1,     0.25,   0.5,   1,      10,
};

void kvm_histogram_observe(kvm_histogram *h, uint64_t ns)
{
	double s = (double)ns / 1e9;
	size_t i = 0;
	while (i < KVM_HISTOGRAM_BUCKETS - 1 && s > bucket_le[i])
		i++;
	__atomic_fetch_add(&h->bucket[i], 1, __ATOMIC_RELAXED);
	__atomic_fetch_add(&h->sum_ns, ns, __ATOMIC_RELAXED);
	__atomic_fetch_add(&h->count, 1, __ATOMIC_RELAXED);
}

void kvm_metrics_histogram(kvm_metrics_out *o, const char *name, const char *labels,
			   const kvm_histogram *h)
{
	const char *sep = labels && labels[0] ? "," : "";
	labels = labels ? labels : "";
	/* Read once: buckets, then count as their sum, so the +Inf bucket
	 * and _count agree even while calls are observed. */
	uint64_t cum = 0;
	for (size_t i = 0; i < KVM_HISTOGRAM_BUCKETS; i++) {
		cum += __atomic_load_n(&h->bucket[i], __ATOMIC_RELAXED);
		if (i < KVM_HISTOGRAM_BUCKETS - 1)
			fprintf(o->f, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep,
				bucket_le[i], (unsigned long long)cum);
		else
			fprintf(o->f, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
				(unsigned long long)cum);
	}
	char full[256];
	snprintf(full, sizeof(full), "%s_sum", name);
	kvm_metrics_sample(o, full, labels,
			   (double)__atomic_load_n(&h->sum_ns, __ATOMIC_RELAXED) / 1e9);
	snprintf(full, sizeof(full), "%s_count", name);
	kvm_metrics_sample(o, full, labels, (double)cum);
}

void kvm_metrics_destroy(kvm_metrics *m)
{
	free(m);
}
