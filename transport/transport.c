/* Backend-independent parts: defaults, dispatch, the blocking waiter. */
#include "transport/transport.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>

void xport_opts_default(xport_opts *o)
{
	memset(o, 0, sizeof *o);
	o->n_conns = 2;
	o->max_inflight = 512;
	o->sockbuf_bytes = 4u << 20;
	o->connect_timeout_ms = 3000;
	o->tx_backlog_bytes = 64u << 20;
	o->bulk_checksum = 1;
	wire_limits_default(&o->limits);
}

int xport_connect(const struct xport_ops *ops, xport_loop *l, const char *host, uint16_t port,
		  const xport_opts *o, xport_peer **out)
{
	return ops->connect(l, host, port, o, out);
}
void xport_close(xport_peer *p)
{
	if (p)
		p->ops->close(p);
}
int xport_get_blocks(xport_peer *p, xport_block_io *b, uint32_t n, uint32_t t, xport_cb cb, void *arg)
{
	return p->ops->get_blocks(p, b, n, t, cb, arg);
}
int xport_put_blocks(xport_peer *p, xport_block_io *b, uint32_t n, uint32_t t, xport_cb cb, void *arg)
{
	return p->ops->put_blocks(p, b, n, t, cb, arg);
}
int xport_attend(xport_peer *p, const wire_shape *s, xport_attend_query *q, uint32_t n, uint32_t t,
		 xport_cb cb, void *arg)
{
	return p->ops->attend(p, s, q, n, t, cb, arg);
}
int xport_append(xport_peer *p, xport_append_io *a, uint32_t n, uint32_t t, xport_cb cb, void *arg)
{
	return p->ops->append(p, a, n, t, cb, arg);
}
int xport_ping(xport_peer *p, uint32_t t, xport_cb cb, void *arg)
{
	return p->ops->ping(p, t, cb, arg);
}
int xport_listen(const struct xport_ops *ops, xport_loop *l, const char *host, uint16_t port,
		 const xport_opts *o, const xport_handlers *h, void *ctx, xport_server **out)
{
	return ops->listen(l, host, port, o, h, ctx, out);
}
void xport_server_close(xport_server *s)
{
	if (s)
		s->ops->server_close(s);
}
void xport_server_stats(xport_server *s, xport_stats *out)
{
	s->ops->server_stats(s, out);
}

struct waiter {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	uint64_t pending;
	int first_error;
};
_Static_assert(sizeof(struct waiter) <= sizeof(xport_waiter), "xport_waiter too small");

void xport_waiter_init(xport_waiter *w)
{
	struct waiter *x = (struct waiter *)(void *)w->opaque;
	pthread_mutex_init(&x->mu, NULL);
	pthread_cond_init(&x->cv, NULL);
	x->pending = 0;
	x->first_error = 0;
}
void xport_waiter_add(xport_waiter *w, uint32_t n)
{
	struct waiter *x = (struct waiter *)(void *)w->opaque;
	pthread_mutex_lock(&x->mu);
	x->pending += n;
	pthread_mutex_unlock(&x->mu);
}
void xport_waiter_cb(void *arg, int status)
{
	struct waiter *x = (struct waiter *)(void *)((xport_waiter *)arg)->opaque;
	pthread_mutex_lock(&x->mu);
	if (status && !x->first_error)
		x->first_error = status;
	if (--x->pending == 0)
		pthread_cond_broadcast(&x->cv);
	pthread_mutex_unlock(&x->mu);
}
int xport_waiter_wait(xport_waiter *w)
{
	struct waiter *x = (struct waiter *)(void *)w->opaque;
	pthread_mutex_lock(&x->mu);
	while (x->pending)
		pthread_cond_wait(&x->cv, &x->mu);
	int rc = x->first_error;
	x->first_error = 0;
	pthread_mutex_unlock(&x->mu);
	return rc;
}
void xport_waiter_destroy(xport_waiter *w)
{
	struct waiter *x = (struct waiter *)(void *)w->opaque;
	pthread_mutex_destroy(&x->mu);
	pthread_cond_destroy(&x->cv);
}
