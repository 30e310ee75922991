/* The daemons' HTTP endpoint: libmicrohttpd on one internal thread serves
 * GET /metrics (kvm_metrics_render) and GET /healthz. */
#include <errno.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <microhttpd.h>

#include "common/addr.h"
#include "common/log.h"
#include "common/metrics.h"

#define TEXT_FORMAT "text/plain; version=0.0.4; charset=utf-8"

struct kvm_metrics_http {
	kvm_metrics *m;
	bool owns_m; /* made by kvm_metrics_serve */
	struct MHD_Daemon *daemon;
	bool healthy; /* read and written with __atomic */
};

static enum MHD_Result respond(struct MHD_Connection *conn, unsigned status, const char *type,
			       char *body, size_t len, bool owned)
{
	struct MHD_Response *r = MHD_create_response_from_buffer(
		len, body, owned ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
	if (!r) {
		if (owned)
			free(body);
		return MHD_NO;
	}
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
	if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
		MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
	enum MHD_Result ret = MHD_queue_response(conn, status, r);
	MHD_destroy_response(r);
	return ret;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
			      const char *method, const char *version, const char *upload,
			      size_t *upload_len, void **req_cls)
{
	kvm_metrics_http *h = cls;
	(void)version;
	(void)upload;
	(void)req_cls;
	static char not_allowed[] = "only GET and HEAD\n", not_found[] =
		"not found: kvmesh serves /metrics and /healthz\n",
		ok[] = "ok\n", unavailable[] = "not serving\n";
	const char *plain = "text/plain; charset=utf-8";
	if (*upload_len) /* a body we do not want: drop it */
		*upload_len = 0;
	if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
		return respond(conn, MHD_HTTP_METHOD_NOT_ALLOWED, plain, not_allowed,
			       sizeof(not_allowed) - 1, false);
	if (strcmp(url, "/metrics") == 0) {
		size_t len;
		char *text = kvm_metrics_render(h->m, &len);
		if (!text)
			return MHD_NO;
		return respond(conn, MHD_HTTP_OK, TEXT_FORMAT, text, len, true);
	}
	if (strcmp(url, "/healthz") == 0) {
		bool healthy = __atomic_load_n(&h->healthy, __ATOMIC_ACQUIRE);
		return healthy ? respond(conn, MHD_HTTP_OK, plain, ok, sizeof(ok) - 1, false)
			       : respond(conn, MHD_HTTP_SERVICE_UNAVAILABLE, plain, unavailable,
					 sizeof(unavailable) - 1, false);
	}
	return respond(conn, MHD_HTTP_NOT_FOUND, plain, not_found, sizeof(not_found) - 1, false);
}

/* libmicrohttpd's own complaints, as log lines like every other. */
static void mhd_log(void *arg, const char *fmt, va_list ap)
{
	(void)arg;
	char msg[512];
	vsnprintf(msg, sizeof(msg), fmt, ap);
	size_t n = strlen(msg);
	while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
		msg[--n] = '\0';
	for (char *p = msg; *p; p++)
		if (*p == '"')
			*p = '\'';
	kvm_log(KVM_LOG_WARN, "metrics_http", "error=\"%s\"", msg);
}

int kvm_metrics_http_start(kvm_metrics *m, const char *addr, int *port, kvm_metrics_http **out,
			   char *err, size_t errlen)
{
	char host[256];
	uint16_t p;
	if (!m || !addr || !out)
		return -EINVAL;
	*out = NULL;
	if (kvm_parse_addr(addr, host, sizeof(host), &p) != 0) {
		snprintf(err, errlen, "\"%s\" is not host:port", addr);
		return -EINVAL;
	}
	struct addrinfo hints = {.ai_family = AF_UNSPEC,
				 .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_PASSIVE | AI_NUMERICSERV},
			*ai;
	char ps[8];
	snprintf(ps, sizeof(ps), "%u", p);
	int gai = getaddrinfo(host[0] ? host : NULL, ps, &hints, &ai);
	if (gai != 0) {
		snprintf(err, errlen, "%s: %s", addr, gai_strerror(gai));
		return -EADDRNOTAVAIL;
	}
	kvm_metrics_http *h = calloc(1, sizeof(*h));
	if (!h) {
		freeaddrinfo(ai);
		return -ENOMEM;
	}
	h->m = m;
	unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;
	if (ai->ai_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	errno = 0;
	h->daemon = MHD_start_daemon(flags, p, NULL, NULL, handle, h, MHD_OPTION_EXTERNAL_LOGGER,
				     mhd_log, NULL, MHD_OPTION_SOCK_ADDR, ai->ai_addr,
				     MHD_OPTION_CONNECTION_LIMIT, 64u,
				     MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
	int saved = errno;
	freeaddrinfo(ai);
	if (!h->daemon) {
		snprintf(err, errlen, "cannot serve on %s: %s", addr,
			 saved ? strerror(saved) : "libmicrohttpd refused");
		free(h);
		return saved ? -saved : -EADDRINUSE;
	}
	const union MHD_DaemonInfo *info =
		MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_BIND_PORT);
	if (port)
		*port = info ? info->port : p;
	*out = h;
	return 0;
}

int kvm_metrics_serve(const char *addr, const kvm_metrics_source *src, size_t n, int *port,
		      kvm_metrics_http **out)
{
	char err[300] = "";
	kvm_metrics *m;
	int rc = kvm_metrics_create(&m);
	for (size_t i = 0; rc == 0 && i < n; i++)
		rc = kvm_metrics_add(m, src[i].fn, src[i].arg);
	if (rc == 0)
		rc = kvm_metrics_http_start(m, addr, port, out, err, sizeof(err));
	if (rc != 0) {
		kvm_log(KVM_LOG_ERROR, "metrics_listen_failed", "addr=%s error=\"%s\"", addr,
			err[0] ? err : strerror(-rc));
		kvm_metrics_destroy(m);
		return rc;
	}
	(*out)->owns_m = true;
	return 0;
}

void kvm_metrics_http_set_healthy(kvm_metrics_http *h, bool healthy)
{
	if (h)
		__atomic_store_n(&h->healthy, healthy, __ATOMIC_RELEASE);
}

void kvm_metrics_http_stop(kvm_metrics_http *h)
{
	if (!h)
		return;
	MHD_stop_daemon(h->daemon);
	if (h->owns_m)
		kvm_metrics_destroy(h->m);
	free(h);
}
