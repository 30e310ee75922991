#include "common/kvm_error.h"

#include <string.h>

const char *kvm_strerror(int rc)
{
	if (rc == 0)
		return "success";
	if (rc > 0)
		return "invalid error code (positive)";
	/* strerrordesc_np returns a static string and, unlike strerror, is safe
	 * to call from several threads. */
	const char *msg = strerrordesc_np(-rc);
	return msg ? msg : "unknown error";
}
