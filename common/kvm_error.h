/* Error codes: every kvmesh function returns 0 or a negative errno value.
 * kvm_strerror turns one into a message for logs and users. */
#ifndef KVMESH_COMMON_KVM_ERROR_H
#define KVMESH_COMMON_KVM_ERROR_H

/* The message for rc (0 or a negative errno code). Never NULL; the string is
 * static and must not be freed. */
const char *kvm_strerror(int rc);

#endif
