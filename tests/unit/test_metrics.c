/* Metrics: the text collectors write (families, escaped labels, cumulative
 * histogram buckets that agree with _count), the HTTP endpoint's answers,
 * and the address parser the endpoint and the data plane share. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/addr.h"
#include "common/metrics.h"

static void two_samples(void *arg, kvm_metrics_out *o)
{
	(void)arg;
	char id[64], labels[96];
	kvm_metrics_escape(id, sizeof(id), "we\"ird\\node\n");
	snprintf(labels, sizeof(labels), "node=\"%s\"", id);
	kvm_metrics_family(o, "t_blocks", "gauge", "Blocks.");
	kvm_metrics_sample(o, "t_blocks", labels, 3);
	kvm_metrics_sample(o, "t_blocks", NULL, 0.25);
}

static void histogram(void *arg, kvm_metrics_out *o)
{
	kvm_metrics_family(o, "t_seconds", "histogram", "Times.");
	kvm_metrics_histogram(o, "t_seconds", "m=\"x\"", arg);
}

static char *render(kvm_metrics *m)
{
	size_t len;
	char *text = kvm_metrics_render(m, &len);
	cr_assert(text);
	cr_assert_eq(strlen(text), len);
	return text;
}

Test(metrics, collectors_write_in_order_with_escaped_labels)
{
	kvm_metrics *m;
	cr_assert_eq(kvm_metrics_create(&m), 0);
	cr_assert_eq(kvm_metrics_add(m, two_samples, NULL), 0);
	char *text = render(m);
	cr_assert_str_eq(text, "# HELP t_blocks Blocks.\n"
			       "# TYPE t_blocks gauge\n"
			       "t_blocks{node=\"we\\\"ird\\\\node\\n\"} 3\n"
			       "t_blocks 0.25\n");
	free(text);
	kvm_metrics_destroy(m);
}

Test(metrics, escape_cuts_to_fit_without_splitting_an_escape)
{
	char small[6];
	kvm_metrics_escape(small, sizeof(small), "ab\"cdef");
	cr_assert_str_eq(small, "ab\\\"");
	kvm_metrics_escape(small, sizeof(small), "abcdefgh");
	cr_assert_str_eq(small, "abc");
}

Test(metrics, histogram_buckets_are_cumulative_and_match_count)
{
	kvm_histogram h = {0};
	kvm_histogram_observe(&h, 40000);	  /* 40 us: first bucket */
	kvm_histogram_observe(&h, 1000000);	  /* 1 ms: le 0.001 */
	kvm_histogram_observe(&h, 3000000);	  /* 3 ms: le 0.005 */
	kvm_histogram_observe(&h, 20000000000ull); /* 20 s: only +Inf */
	kvm_metrics *m;
	cr_assert_eq(kvm_metrics_create(&m), 0);
	kvm_metrics_add(m, histogram, &h);
	char *text = render(m);
	const struct {
		const char *line;
	} want[] = {
		{"t_seconds_bucket{m=\"x\",le=\"5e-05\"} 1\n"},
		{"t_seconds_bucket{m=\"x\",le=\"0.0005\"} 1\n"},
		{"t_seconds_bucket{m=\"x\",le=\"0.001\"} 2\n"},
		{"t_seconds_bucket{m=\"x\",le=\"0.0025\"} 2\n"},
		{"t_seconds_bucket{m=\"x\",le=\"0.005\"} 3\n"},
		{"t_seconds_bucket{m=\"x\",le=\"10\"} 3\n"},
		{"t_seconds_bucket{m=\"x\",le=\"+Inf\"} 4\n"},
		{"t_seconds_sum{m=\"x\"} 20.00404\n"},
		{"t_seconds_count{m=\"x\"} 4\n"},
	};
	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
		cr_assert(strstr(text, want[i].line), "missing %s in:\n%s", want[i].line, text);
	free(text);
	kvm_metrics_destroy(m);
}

Test(metrics, endpoint_refuses_a_taken_port_and_a_bad_address)
{
	kvm_metrics *m;
	kvm_metrics_create(&m);
	kvm_metrics_http *a, *b;
	char err[300];
	int port = 0;
	cr_assert_eq(kvm_metrics_http_start(m, "127.0.0.1:0", &port, &a, err, sizeof(err)), 0, "%s",
		     err);
	cr_assert(port > 0);
	char addr[64];
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
	cr_assert_neq(kvm_metrics_http_start(m, addr, NULL, &b, err, sizeof(err)), 0);
	cr_assert(strstr(err, "cannot serve on"), "%s", err);
	cr_assert_eq(kvm_metrics_http_start(m, "localhost", NULL, &b, err, sizeof(err)), -EINVAL);
	cr_assert(strstr(err, "not host:port"), "%s", err);
	kvm_metrics_http_stop(a);
	kvm_metrics_destroy(m);
}

Test(addr, host_port_forms)
{
	char host[64];
	uint16_t port;
	cr_assert_eq(kvm_parse_addr("10.0.0.1:7400", host, sizeof(host), &port), 0);
	cr_assert_str_eq(host, "10.0.0.1");
	cr_assert_eq(port, 7400);
	cr_assert_eq(kvm_parse_addr("[::1]:0", host, sizeof(host), &port), 0);
	cr_assert_str_eq(host, "::1");
	cr_assert_eq(port, 0);
	cr_assert_eq(kvm_parse_addr(":7401", host, sizeof(host), &port), 0);
	cr_assert_str_eq(host, "");
	cr_assert_eq(port, 7401);
	const char *bad[] = {"nohost", "h:", "h:65536", "h:-1", "h:12x", "h:+5", NULL};
	for (int i = 0; bad[i]; i++)
		cr_assert_eq(kvm_parse_addr(bad[i], host, sizeof(host), &port), -EINVAL, "%s",
			     bad[i]);
	cr_assert_eq(kvm_parse_addr("a-very-long-host-name:1", host, 8, &port), -EINVAL);
}
