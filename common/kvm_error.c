#include "common/kvm_error.h"

#include <errno.h>
#include <string.h>

const char *kvm_strerror(int rc)
{
	if (rc == 0)
		return "success";
	if (rc > 0)
		return "invalid error code (positive)";
	/* The project's own meaning of a borrowed code. */
	if (rc == -EXDEV)
		return "the sequence's home moved to another node";
	if (rc == -ENODATA)
		return "the sequence is degraded: KV it needs was lost with a node (release it, or prefill it again)";
	/* strerrordesc_np returns a static string and, unlike strerror, is safe
	 * to call from several threads. */
	const char *msg = strerrordesc_np(-rc);
	return msg ? msg : "unknown error";
}
