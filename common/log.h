/* Logging: one line per event, logfmt (key=value), to stderr.
 *
 *   kvm_log(KVM_LOG_INFO, "conn_open", "peer=%s fd=%d", addr, fd);
 *   -> ts=2026-11-28T18:00:00.123Z level=info event=conn_open peer=127.0.0.1:7000 fd=5
 *
 * The line is formatted into a stack buffer and written with one write(2), so
 * lines from several threads never interleave. Lines longer than 1 KiB are cut.
 * The threshold is read once from the environment KVMESH_LOG_LEVEL
 * (debug|info|warn|error|off; default info) and cached; that cache and stderr
 * are the only process-wide state (the "log sink" of the conventions). */
#ifndef KVMESH_COMMON_LOG_H
#define KVMESH_COMMON_LOG_H

enum kvm_log_level { KVM_LOG_DEBUG = 0, KVM_LOG_INFO, KVM_LOG_WARN, KVM_LOG_ERROR, KVM_LOG_OFF };

/* Logs one event if level passes the threshold. fmt (printf-style, may be NULL)
 * appends further key=value pairs; values with spaces are the caller's to quote. */
void kvm_log(enum kvm_log_level level, const char *event, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* True if a line at this level would be written (to skip costly arguments). */
int kvm_log_enabled(enum kvm_log_level level);

#endif
