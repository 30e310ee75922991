#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/addr.h"

int kvm_parse_addr(const char *s, char *host, size_t cap, uint16_t *port)
{
	const char *colon = s ? strrchr(s, ':') : NULL;
	if (!colon)
		return -EINVAL;
	size_t hl = (size_t)(colon - s);
	const char *h = s;
	if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']')
		h++, hl -= 2;
	char *end;
	errno = 0;
	unsigned long p = strtoul(colon + 1, &end, 10);
	if (hl >= cap || *end || errno || p > 65535 || end == colon + 1 || colon[1] == '-' ||
	    colon[1] == '+' || colon[1] == ' ')
		return -EINVAL;
	memcpy(host, h, hl);
	host[hl] = '\0';
	*port = (uint16_t)p;
	return 0;
}
