#include "common/log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* The log sink's only state: the threshold, parsed on first use. -1 = unread. */
static atomic_int log_threshold = -1;

static int threshold(void)
{
	int t = atomic_load_explicit(&log_threshold, memory_order_relaxed);
	if (t >= 0)
		return t;
	t = KVM_LOG_INFO;
	const char *e = getenv("KVMESH_LOG_LEVEL");
	if (e) {
		static const char *names[] = {"debug", "info", "warn", "error", "off"};
		for (int i = 0; i < 5; i++)
			if (strcasecmp(e, names[i]) == 0)
				t = i;
	}
	atomic_store_explicit(&log_threshold, t, memory_order_relaxed);
	return t;
}

int kvm_log_enabled(enum kvm_log_level level)
{
	return (int)level >= threshold() && level < KVM_LOG_OFF;
}

void kvm_log(enum kvm_log_level level, const char *event, const char *fmt, ...)
{
	static const char *names[] = {"debug", "info", "warn", "error"};
	if (!kvm_log_enabled(level))
		return;
	char line[1024];
	struct timespec ts;
	struct tm tm;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	int n = snprintf(line, sizeof line, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s event=%s",
			 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
			 ts.tv_nsec / 1000000, names[level], event ? event : "-");
	if (n < 0)
		return;
	if ((size_t)n < sizeof line - 2 && fmt && *fmt) {
		line[n++] = ' ';
		va_list ap;
		va_start(ap, fmt);
		int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
		va_end(ap);
		if (m > 0)
			n += m;
	}
	if ((size_t)n > sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	ssize_t w = write(STDERR_FILENO, line, (size_t)n);
	(void)w;
}
