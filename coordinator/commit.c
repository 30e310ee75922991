/* Acknowledgements that wait for the state store's sync without holding a
 * server thread: a handler that changed the store queues its call here, and
 * one committer thread syncs everything queued so far with one fdatasync and
 * finishes those calls. While it syncs, new calls queue up for the next one,
 * so the more clients wait, the more each sync covers (group commit). Where
 * syncs take less than INLINE_SYNC_NS (tmpfs, a disk whose cache survives
 * power loss), waking the committer would cost more than the sync: the
 * handler's thread syncs itself. */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "coordinator/coord_impl.h"

#define INLINE_SYNC_NS 50000

typedef struct commit_rec {
	struct commit_rec *next;
	kvm_rpc_call *call;
	uint64_t ticket;
} commit_rec;

static void *committer_main(void *arg)
{
	kvm_coord *c = arg;
	pthread_mutex_lock(&c->commit_mu);
	for (;;) {
		while (!c->commit_head && !c->commit_stop)
			pthread_cond_wait(&c->commit_cv, &c->commit_mu);
		commit_rec *list = c->commit_head;
		if (!list)
			break; /* stopping, and nothing left */
		c->commit_head = c->commit_tail = NULL;
		pthread_mutex_unlock(&c->commit_mu);

		uint64_t upto = 0;
		for (commit_rec *r = list; r; r = r->next)
			if (r->ticket > upto)
				upto = r->ticket;
		int src = kvm_state_sync(c->st, upto);
		while (list) {
			commit_rec *nx = list->next;
			kvm_rpc_finish(list->call,
				       src == 0 ? KVM_RPC_OK : coord_store_fail(c, list->call, src));
			free(list);
			list = nx;
		}
		pthread_mutex_lock(&c->commit_mu);
	}
	pthread_mutex_unlock(&c->commit_mu);
	return NULL;
}

int coord_commit_start(kvm_coord *c)
{
	pthread_mutex_init(&c->commit_mu, NULL);
	pthread_cond_init(&c->commit_cv, NULL);
	if (pthread_create(&c->committer, NULL, committer_main, c) != 0)
		return -EAGAIN;
	c->committer_running = true;
	return 0;
}

void coord_commit_stop(kvm_coord *c)
{
	if (!c->committer_running)
		return;
	pthread_mutex_lock(&c->commit_mu);
	c->commit_stop = true;
	pthread_cond_signal(&c->commit_cv);
	pthread_mutex_unlock(&c->commit_mu);
	pthread_join(c->committer, NULL);
	c->committer_running = false;
	pthread_cond_destroy(&c->commit_cv);
	pthread_mutex_destroy(&c->commit_mu);
}

int coord_reply_when_durable(kvm_coord *c, kvm_rpc_call *call, int rc, uint64_t ticket)
{
	if (rc != KVM_RPC_OK || ticket == 0)
		return rc;
	/* A sync quicker than waking the committer (tmpfs; a disk whose cache
	 * survives power loss) is done here, on the server's thread. */
	commit_rec *r = kvm_state_sync_ns(c->st) < INLINE_SYNC_NS ? NULL : malloc(sizeof(*r));
	if (!r || !c->committer_running) { /* wait here instead */
		free(r);
		int src = kvm_state_sync(c->st, ticket);
		return src == 0 ? rc : coord_store_fail(c, call, src);
	}
	r->next = NULL;
	r->call = call;
	r->ticket = ticket;
	pthread_mutex_lock(&c->commit_mu);
	if (c->commit_tail)
		c->commit_tail->next = r;
	else
		c->commit_head = r;
	c->commit_tail = r;
	pthread_cond_signal(&c->commit_cv);
	pthread_mutex_unlock(&c->commit_mu);
	return KVM_RPC_DEFERRED;
}

int coord_store_fail(kvm_coord *c, kvm_rpc_call *call, int src)
{
	int failed = kvm_state_failed(c->st);
	if (failed) {
		pthread_mutex_lock(&c->commit_mu); /* a leaf lock: taken under mu too */
		bool first = !c->store_failed_told;
		c->store_failed_told = true;
		pthread_mutex_unlock(&c->commit_mu);
		if (first) {
			kvm_log(KVM_LOG_ERROR, "state_store_failed",
				"error=\"%s\" effect=\"stopping: what is durable is unknown; "
				"a restart recovers what is on disk\"",
				strerror(-failed));
			kill(getpid(), SIGTERM);
		}
		return kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE, "state store failed (%s): "
				    "the coordinator is restarting", strerror(-failed));
	}
	if (src == -ENOSPC || src == -EDQUOT || src == -EFBIG)
		return kvm_rpc_fail(call, KVM_RPC_RESOURCE_EXHAUSTED,
				    "state store: %s: its disk has no room for new state "
				    "(releases still work; free space and it resumes)",
				    strerror(-src));
	return kvm_rpc_fail(call, KVM_RPC_UNAVAILABLE, "state store: %s", strerror(-src));
}
