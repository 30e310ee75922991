/* Home sequences (stage 2 placeholder). */
#include <errno.h>

#include "node-agent/agent.h"

int homeseq_create(agent *a) { (void)a; return 0; }
void homeseq_destroy(agent *a) { (void)a; }
int homeseq_append_wire(agent *a, const wire_append_ref *ref, const void *k, const void *v)
{ (void)a; (void)ref; (void)k; (void)v; return -EOPNOTSUPP; }
int homeseq_attend_wire(agent *a, const wire_attend_view *v, const float *q, float *o, float *lse,
			int *st, xport_attend_token *tok)
{ (void)a; (void)v; (void)q; (void)o; (void)lse; (void)st; (void)tok; return -EOPNOTSUPP; }
void homeseq_release(agent *a, const char *seq_id, uint64_t data_id) { (void)a; (void)seq_id; (void)data_id; }
int homeseq_rpc_attend_append(void *arg, kvm_rpc_call *call, const uint8_t *req, size_t len)
{ (void)arg; (void)req; (void)len; return kvm_rpc_fail(call, KVM_RPC_UNIMPLEMENTED, "soon"); }
uint32_t homeseq_count(agent *a) { (void)a; return 0; }
