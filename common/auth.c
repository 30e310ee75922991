#include "common/auth.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"

int kvm_auth_load_token(const char *path, char *tok, size_t cap, char *err, size_t errlen)
{
	if (!path || !*path || !tok || cap < 2)
		return -EINVAL;
	tok[0] = '\0';
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;
		snprintf(err, errlen, "cannot read the token file %s: %s", path, strerror(e));
		return -e;
	}
	struct stat st;
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		snprintf(err, errlen, "the token file %s is not a regular file", path);
		return -EINVAL;
	}
	/* A secret others can read is no secret: refuse it, as ssh does. */
	if (st.st_mode & 077) {
		close(fd);
		snprintf(err, errlen,
			 "the token file %s may be read or written by group or others (mode %04o); "
			 "run: chmod 600 %s",
			 path, (unsigned)(st.st_mode & 07777), path);
		return -EPERM;
	}
	/* One byte more than fits, to tell a long token from one that fits. */
	char buf[KVM_AUTH_TOKEN_MAX + 64];
	size_t n = 0;
	for (;;) {
		ssize_t r = read(fd, buf + n, sizeof(buf) - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			int e = errno;
			close(fd);
			snprintf(err, errlen, "cannot read the token file %s: %s", path, strerror(e));
			return -e;
		}
		if (r == 0 || (n += (size_t)r) == sizeof(buf))
			break;
	}
	close(fd);
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' ||
			 buf[n - 1] == '\t'))
		n--;
	int rc = 0;
	if (n == 0) {
		snprintf(err, errlen, "the token file %s is empty (write a token into it, e.g. "
			 "openssl rand -hex 32 > %s)", path, path);
		rc = -EINVAL;
	} else if (n > KVM_AUTH_TOKEN_MAX || n >= cap) {
		snprintf(err, errlen, "the token in %s is longer than %d bytes", path,
			 KVM_AUTH_TOKEN_MAX);
		rc = -E2BIG;
	} else {
		for (size_t i = 0; i < n && rc == 0; i++)
			if ((unsigned char)buf[i] < 0x20 || (unsigned char)buf[i] > 0x7e) {
				snprintf(err, errlen, "the token in %s holds a byte that is not printable "
					 "ASCII (at offset %zu); gRPC metadata cannot carry it", path, i);
				rc = -EINVAL;
			}
	}
	if (rc == 0) {
		memcpy(tok, buf, n);
		tok[n] = '\0';
	}
	memset(buf, 0, sizeof(buf));
	return rc;
}

int kvm_auth_init(const char *prog, const char *path, char *tok, size_t cap, char *err, size_t errlen)
{
	if (path && *path)
		return kvm_auth_load_token(path, tok, cap, err, errlen);
	if (tok && cap)
		tok[0] = '\0';
	kvm_log(KVM_LOG_WARN, "auth_disabled",
		"prog=%s msg=\"no --auth-token-file: anyone who reaches this daemon's ports may use "
		"the cluster\"", prog);
	return 0;
}

bool kvm_auth_equal(const void *presented, size_t presented_len, const void *expected,
		    size_t expected_len)
{
	const volatile unsigned char *p = presented, *e = expected;
	unsigned diff = presented_len != expected_len;
	/* Always walks the expected length; a short presented token reads as zeros. */
	for (size_t i = 0; i < expected_len; i++)
		diff |= (unsigned)((i < presented_len ? p[i] : 0) ^ e[i]);
	return diff == 0 && expected_len > 0;
}
