/* Internal to transport/: the event loop every backend registers its file
 * descriptors with (TCP sockets now; an RDMA completion channel later).
 * One thread runs the loop; everything a backend keeps per connection is
 * touched only on that thread. Other threads hand work over with loop_post.
 * Modelled on Redis's ae: a tiny loop behind a fixed set of functions. */
#ifndef KVMESH_TRANSPORT_LOOP_INT_H
#define KVMESH_TRANSPORT_LOOP_INT_H

#include <stdint.h>

#include "transport/transport.h"

/* A registered file descriptor: cb runs on the loop thread with the epoll
 * events. Embedded in the backend's object; must outlive its registration. */
struct loop_src {
	void (*cb)(struct loop_src *src, uint32_t events);
	int fd;
};

/* A unit of work posted from any thread; fn runs on the loop thread.
 * Embedded in the caller's object (no allocation per post). */
struct loop_task {
	struct loop_task *next;
	void (*fn)(struct loop_task *t);
};

/* A periodic check (deadlines): fn runs about every tick_ms while registered
 * and returns nothing; registration is loop-thread only. */
struct loop_ticker {
	struct loop_ticker *next, *prev;
	void (*fn)(struct loop_ticker *t, int64_t now_ns);
};

/* The first member of every backend's deferred-ATTEND token: task.fn is set by the
 * backend when it creates the token; xport_attend_complete stores rc and posts
 * task to loop. */
struct attend_tok_base {
	struct loop_task task;
	xport_loop *loop;
	int rc;
};

int loop_add(xport_loop *l, struct loop_src *s, uint32_t events);
int loop_mod(xport_loop *l, struct loop_src *s, uint32_t events);
void loop_del(xport_loop *l, struct loop_src *s);
/* Thread-safe; wakes the loop. */
void loop_post(xport_loop *l, struct loop_task *t);
/* Runs t on the loop thread and waits for it (inline if already there). */
void loop_run_sync(xport_loop *l, struct loop_task *t);
int loop_in_thread(const xport_loop *l);
void loop_ticker_add(xport_loop *l, struct loop_ticker *t);
void loop_ticker_del(xport_loop *l, struct loop_ticker *t);

int64_t loop_now_ns(void);

#endif
