/* The transport event loop: epoll, an eventfd for posted work, a coarse
 * ticker for deadlines. One thread per loop. */
#include "transport/loop_int.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"

#define TICK_MS 5 /* deadline resolution; what a missed deadline may overshoot by */

struct xport_loop {
	int epfd;
	struct loop_src wake; /* the eventfd */
	pthread_t thread;
	pthread_mutex_t mu; /* guards the posted-task queue */
	struct loop_task *head, *tail;
	atomic_bool stop;
	struct loop_ticker tickers; /* list head; loop thread only */
	int64_t next_tick;
};

int64_t loop_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int loop_add(xport_loop *l, struct loop_src *s, uint32_t events)
{
	struct epoll_event ev = {.events = events, .data.ptr = s};
	return epoll_ctl(l->epfd, EPOLL_CTL_ADD, s->fd, &ev) ? -errno : 0;
}

int loop_mod(xport_loop *l, struct loop_src *s, uint32_t events)
{
	struct epoll_event ev = {.events = events, .data.ptr = s};
	return epoll_ctl(l->epfd, EPOLL_CTL_MOD, s->fd, &ev) ? -errno : 0;
}

void loop_del(xport_loop *l, struct loop_src *s)
{
	epoll_ctl(l->epfd, EPOLL_CTL_DEL, s->fd, NULL);
}

void loop_post(xport_loop *l, struct loop_task *t)
{
	t->next = NULL;
	pthread_mutex_lock(&l->mu);
	int was_empty = l->head == NULL;
	if (l->tail)
		l->tail->next = t;
	else
		l->head = t;
	l->tail = t;
	pthread_mutex_unlock(&l->mu);
	/* One wake-up per burst: the loop drains the whole queue. */
	if (was_empty) {
		uint64_t one = 1;
		ssize_t w = write(l->wake.fd, &one, sizeof one);
		(void)w;
	}
}

struct sync_task {
	struct loop_task t;
	struct loop_task *inner;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int done;
};

static void sync_fn(struct loop_task *t)
{
	struct sync_task *s = (struct sync_task *)t;
	s->inner->fn(s->inner);
	pthread_mutex_lock(&s->mu);
	s->done = 1;
	pthread_cond_signal(&s->cv);
	pthread_mutex_unlock(&s->mu);
}

void loop_run_sync(xport_loop *l, struct loop_task *t)
{
	if (loop_in_thread(l)) {
		t->fn(t);
		return;
	}
	struct sync_task s = {.t.fn = sync_fn, .inner = t};
	pthread_mutex_init(&s.mu, NULL);
	pthread_cond_init(&s.cv, NULL);
	loop_post(l, &s.t);
	pthread_mutex_lock(&s.mu);
	while (!s.done)
		pthread_cond_wait(&s.cv, &s.mu);
	pthread_mutex_unlock(&s.mu);
	pthread_cond_destroy(&s.cv);
	pthread_mutex_destroy(&s.mu);
}

int loop_in_thread(const xport_loop *l)
{
	return pthread_equal(pthread_self(), l->thread);
}

void loop_ticker_add(xport_loop *l, struct loop_ticker *t)
{
	t->next = l->tickers.next;
	t->prev = &l->tickers;
	l->tickers.next->prev = t;
	l->tickers.next = t;
}

void loop_ticker_del(xport_loop *l, struct loop_ticker *t)
{
	(void)l;
	if (!t->next)
		return;
	t->prev->next = t->next;
	t->next->prev = t->prev;
	t->next = t->prev = NULL;
}

static void drain_posted(xport_loop *l)
{
	pthread_mutex_lock(&l->mu);
	struct loop_task *t = l->head;
	l->head = l->tail = NULL;
	pthread_mutex_unlock(&l->mu);
	while (t) {
		struct loop_task *next = t->next; /* fn may free t */
		t->fn(t);
		t = next;
	}
}

static void wake_cb(struct loop_src *s, uint32_t ev)
{
	(void)ev;
	uint64_t v;
	ssize_t r = read(s->fd, &v, sizeof v);
	(void)r;
}

static void *loop_main(void *arg)
{
	xport_loop *l = arg;
	struct epoll_event evs[64];
	while (!atomic_load(&l->stop)) {
		int timeout = l->tickers.next != &l->tickers ? TICK_MS : -1;
		int n = epoll_wait(l->epfd, evs, 64, timeout);
		if (n < 0 && errno != EINTR) {
			kvm_log(KVM_LOG_ERROR, "loop_epoll_failed", "err=%d", errno);
			break;
		}
		for (int i = 0; i < n; i++) {
			struct loop_src *s = evs[i].data.ptr;
			s->cb(s, evs[i].events);
		}
		drain_posted(l);
		if (l->tickers.next != &l->tickers) {
			int64_t now = loop_now_ns();
			if (now >= l->next_tick) {
				l->next_tick = now + TICK_MS * 1000000LL;
				for (struct loop_ticker *t = l->tickers.next, *nx; t != &l->tickers; t = nx) {
					nx = t->next; /* fn may unregister t */
					t->fn(t, now);
				}
			}
		}
	}
	drain_posted(l);
	return NULL;
}

int xport_loop_create(xport_loop **out)
{
	int rc;
	xport_loop *l = calloc(1, sizeof *l);
	if (!l)
		return -ENOMEM;
	l->tickers.next = l->tickers.prev = &l->tickers;
	pthread_mutex_init(&l->mu, NULL);
	l->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (l->epfd < 0) {
		rc = -errno;
		goto clean_alloc;
	}
	l->wake.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (l->wake.fd < 0) {
		rc = -errno;
		goto clean_ep;
	}
	l->wake.cb = wake_cb;
	rc = loop_add(l, &l->wake, EPOLLIN);
	if (rc)
		goto clean_ev;
	rc = -pthread_create(&l->thread, NULL, loop_main, l);
	if (rc)
		goto clean_ev;
	*out = l;
	return 0;
clean_ev:
	close(l->wake.fd);
clean_ep:
	close(l->epfd);
clean_alloc:
	pthread_mutex_destroy(&l->mu);
	free(l);
	return rc;
}

static void stop_fn(struct loop_task *t)
{
	(void)t;
}

void xport_loop_destroy(xport_loop *l)
{
	if (!l)
		return;
	atomic_store(&l->stop, 1);
	struct loop_task t = {.fn = stop_fn};
	loop_post(l, &t);
	pthread_join(l->thread, NULL);
	close(l->wake.fd);
	close(l->epfd);
	pthread_mutex_destroy(&l->mu);
	free(l);
}
