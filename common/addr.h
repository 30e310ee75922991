/* Network addresses as flags and configuration write them. */
#ifndef KVMESH_COMMON_ADDR_H
#define KVMESH_COMMON_ADDR_H

#include <stddef.h>
#include <stdint.h>

/* Splits "host:port", "[v6]:port" or ":port" (host empty): the host into
 * host[cap], the port (0..65535) into *port. -EINVAL for anything else. */
int kvm_parse_addr(const char *s, char *host, size_t cap, uint16_t *port);

#endif
