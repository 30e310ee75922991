/* Worker pools: a FIFO of jobs served by a few threads, each with its own
 * one-thread kernel context (a da_ctx serves one caller at a time). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "node-agent/agent.h"

struct job {
	wjob_fn fn;
	void *arg;
	struct job *next;
};

struct wpool {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct job *head, *tail;
	bool stopping;
	unsigned n;
	pthread_t *th;
	da_ctx **ctx;
};

struct wstart {
	wpool *p;
	unsigned i;
};

static void *worker_main(void *arg)
{
	struct wstart *ws = arg;
	wpool *p = ws->p;
	da_ctx *ctx = p->ctx[ws->i];
	free(ws);
	pthread_mutex_lock(&p->mu);
	for (;;) {
		while (!p->head && !p->stopping)
			pthread_cond_wait(&p->cv, &p->mu);
		struct job *j = p->head;
		if (!j)
			break; /* stopping and drained */
		p->head = j->next;
		if (!p->head)
			p->tail = NULL;
		pthread_mutex_unlock(&p->mu);
		j->fn(j->arg, ctx);
		free(j);
		pthread_mutex_lock(&p->mu);
	}
	pthread_mutex_unlock(&p->mu);
	return NULL;
}

int wpool_create(unsigned n, const char *name, wpool **out)
{
	wpool *p = calloc(1, sizeof *p);
	if (!p || n == 0) {
		free(p);
		return n ? -ENOMEM : -EINVAL;
	}
	pthread_mutex_init(&p->mu, NULL);
	pthread_cond_init(&p->cv, NULL);
	p->th = calloc(n, sizeof *p->th);
	p->ctx = calloc(n, sizeof *p->ctx);
	int rc = p->th && p->ctx ? 0 : -ENOMEM;
	for (unsigned i = 0; rc == 0 && i < n; i++) {
		struct wstart *ws = malloc(sizeof *ws);
		if (!ws || (rc = da_ctx_create(1, &p->ctx[i])) != 0) {
			free(ws);
			rc = rc ? rc : -ENOMEM;
			break;
		}
		*ws = (struct wstart){p, i};
		if (pthread_create(&p->th[i], NULL, worker_main, ws) != 0) {
			free(ws);
			da_ctx_destroy(p->ctx[i]);
			p->ctx[i] = NULL;
			rc = -EAGAIN;
			break;
		}
		p->n++;
	}
	if (rc) {
		kvm_log(KVM_LOG_ERROR, "workers_failed", "pool=%s error=\"%s\"", name, strerror(-rc));
		wpool_destroy(p);
		return rc;
	}
	*out = p;
	return 0;
}

int wpool_submit(wpool *p, wjob_fn fn, void *arg)
{
	struct job *j = malloc(sizeof *j);
	if (!j)
		return -ENOMEM;
	*j = (struct job){fn, arg, NULL};
	pthread_mutex_lock(&p->mu);
	if (p->stopping) {
		pthread_mutex_unlock(&p->mu);
		free(j);
		return -ECANCELED;
	}
	if (p->tail)
		p->tail->next = j;
	else
		p->head = j;
	p->tail = j;
	pthread_cond_signal(&p->cv);
	pthread_mutex_unlock(&p->mu);
	return 0;
}

void wpool_destroy(wpool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->mu);
	p->stopping = true;
	pthread_cond_broadcast(&p->cv);
	pthread_mutex_unlock(&p->mu);
	for (unsigned i = 0; i < p->n; i++)
		pthread_join(p->th[i], NULL);
	for (unsigned i = 0; p->ctx && i < p->n; i++)
		da_ctx_destroy(p->ctx[i]);
	free(p->th);
	free(p->ctx);
	pthread_mutex_destroy(&p->mu);
	pthread_cond_destroy(&p->cv);
	free(p);
}
