/* The cluster's shared secret: one token that every daemon, kvmeshctl and
 * libkvmesh present (gRPC metadata `authorization: Bearer <token>`, the data
 * plane's HELLO auth field) and that every server checks. It is read from a
 * file that only its owner may read, as ssh keys are. The token authenticates
 * but travels in clear text: it keeps strangers on a shared network out, not
 * someone who can read the traffic (that needs TLS). */
#ifndef KVMESH_COMMON_AUTH_H
#define KVMESH_COMMON_AUTH_H

#include <stdbool.h>
#include <stddef.h>

/* The longest token (the data plane's HELLO carries at most 1024 auth bytes). */
#define KVM_AUTH_TOKEN_MAX 1024

/* Reads the token in the file at path into tok (cap bytes, NUL-terminated;
 * cap > KVM_AUTH_TOKEN_MAX is enough), trailing newlines and spaces stripped.
 * Fails with a message in err saying what is wrong and how to fix it:
 * -EPERM if group or others may read or write the file (chmod 600 fixes it),
 * -EINVAL if it is empty or holds characters other than printable ASCII
 * (gRPC metadata cannot carry them), -E2BIG if it is too long, or the errno
 * of open/read. */
int kvm_auth_load_token(const char *path, char *tok, size_t cap, char *err, size_t errlen);

/* A daemon's start: with a path, kvm_auth_load_token; without one (NULL or
 * ""), tok is "" and a warning is logged that anyone who reaches the ports
 * may use the cluster. prog names the daemon in the message. */
int kvm_auth_init(const char *prog, const char *path, char *tok, size_t cap, char *err, size_t errlen);

/* Whether the presented bytes equal the expected token. The time taken
 * depends on the expected length only, never on where the bytes differ, so
 * that a client cannot guess the token byte by byte from response times. */
bool kvm_auth_equal(const void *presented, size_t presented_len, const void *expected,
		    size_t expected_len);

#endif
