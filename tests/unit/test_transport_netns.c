/* Two network namespaces joined by a veth pair, created by the test (root
 * needed; skipped with the reason otherwise): the server listens inside the
 * namespace, the client talks to it across the veth. With `tc netem` (when
 * the kernel has sch_netem) a delay and loss are added; a link that goes dark
 * makes requests fail with -ETIMEDOUT by their deadline: nothing hangs.
 * Traffic stays on the veth pair the test created. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "transport/transport.h"

static char ns[32], veth[16], peer_ip[32], cmd[512];
static int have_ns, have_netem;

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(cmd, sizeof cmd, fmt, ap);
	va_end(ap);
	char full[600];
	snprintf(full, sizeof full, "%s >/dev/null 2>&1", cmd);
	return system(full);
}

static void setup(void)
{
	int id = (int)(getpid() % 200) + 20;
	snprintf(ns, sizeof ns, "kvmt%d", (int)getpid());
	snprintf(veth, sizeof veth, "kvt%d", (int)getpid() % 100000);
	snprintf(peer_ip, sizeof peer_ip, "10.213.%d.2", id);
	have_ns = sh("ip netns add %s", ns) == 0;
	if (!have_ns)
		return;
	if (sh("ip link add %sa type veth peer name %sb", veth, veth) || sh("ip link set %sb netns %s", veth, ns) ||
	    sh("ip addr add 10.213.%d.1/30 dev %sa", id, veth) || sh("ip link set %sa up", veth) ||
	    sh("ip -n %s addr add %s/30 dev %sb", ns, peer_ip, veth) || sh("ip -n %s link set %sb up", ns, veth) ||
	    sh("ip -n %s link set lo up", ns)) {
		sh("ip link del %sa", veth);
		sh("ip netns del %s", ns);
		have_ns = 0;
		return;
	}
	have_netem = sh("tc qdisc add dev %sa root netem delay 5ms loss 1%%", veth) == 0 &&
		     sh("ip netns exec %s tc qdisc add dev %sb root netem delay 5ms loss 1%%", ns, veth) == 0;
}

/* Idempotent: called before a skip (which does not run .fini) and as .fini. */
static void teardown(void)
{
	if (!have_ns)
		return;
	sh("ip link del %sa", veth);
	sh("ip netns del %s", ns);
	have_ns = 0;
}

TestSuite(netns, .init = setup, .fini = teardown, .timeout = 60);

static int h_get(void *ctx, const wire_block_ref *r, const void **data, void **pin, uint64_t *csum)
{
	(void)csum;
	const uint8_t *mem = ctx;
	if ((uint64_t)r->offset + r->len > (4u << 20))
		return -ERANGE;
	*data = mem + r->offset;
	*pin = NULL;
	return 0;
}

/* Listens inside the namespace: the listening socket is created while this
 * thread is in it, then the thread goes back. */
static xport_server *listen_in_ns(xport_loop *l, const uint8_t *mem)
{
	char path[128];
	snprintf(path, sizeof path, "/var/run/netns/%s", ns);
	int self = open("/proc/self/ns/net", O_RDONLY);
	int target = open(path, O_RDONLY);
	cr_assert(self >= 0 && target >= 0);
	cr_assert_eq(setns(target, CLONE_NEWNET), 0);
	xport_handlers h = {.get = h_get};
	xport_server *s = NULL;
	int rc = xport_tcp_listen(l, peer_ip, 0, NULL, &h, (void *)mem, &s);
	cr_assert_eq(setns(self, CLONE_NEWNET), 0);
	close(self);
	close(target);
	cr_assert_eq(rc, 0);
	return s;
}

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

Test(netns, across_veth_then_link_dark)
{
	if (!have_ns)
		cr_skip_test("cannot create network namespaces here (needs root and `ip netns`)");
	uint8_t *mem = malloc(4u << 20);
	for (size_t i = 0; i < (4u << 20); i++)
		mem[i] = (uint8_t)(i * 7 + 3);
	xport_loop *sl, *cl;
	cr_assert_eq(xport_loop_create(&sl), 0);
	cr_assert_eq(xport_loop_create(&cl), 0);
	xport_server *srv = listen_in_ns(sl, mem);
	xport_peer *p;
	xport_opts o;
	xport_opts_default(&o);
	o.n_conns = 2;
	cr_assert_eq(xport_tcp_connect(cl, peer_ip, srv->port, &o, &p), 0);

	/* Blocks of 64 KB .. 2 MB, 24 in flight, across the veth (with netem's
	 * delay and loss when the kernel has it): all complete, bytes intact. */
	enum { N = 24 };
	uint8_t *dst[N];
	xport_block_io io[N];
	xport_waiter w;
	xport_waiter_init(&w);
	xport_waiter_add(&w, N);
	for (int i = 0; i < N; i++) {
		uint32_t len = (64u << 10) << (i % 6);
		dst[i] = calloc(1, len);
		io[i] = (xport_block_io){.ref = {{0, 1, 0}, (uint32_t)i * 4096, len}, .buf = dst[i]};
		cr_assert_eq(xport_get_blocks(p, &io[i], 1, 20000, xport_waiter_cb, &w), 0);
	}
	cr_assert_eq(xport_waiter_wait(&w), 0);
	for (int i = 0; i < N; i++) {
		cr_assert_eq(io[i].status, 0);
		cr_assert(memcmp(dst[i], mem + (size_t)i * 4096, io[i].ref.len) == 0, "block %d intact", i);
	}

	/* The link goes dark (100% loss, or the far end down without netem):
	 * requests fail by their deadline, nothing hangs. */
	if (have_netem)
		sh("tc qdisc change dev %sa root netem loss 100%%", veth);
	else
		sh("ip -n %s link set %sb down", ns, veth);
	xport_waiter_add(&w, 4);
	double t0 = now_ms();
	for (int i = 0; i < 4; i++)
		cr_assert_eq(xport_get_blocks(p, &io[i], 1, 400, xport_waiter_cb, &w), 0);
	int rc = xport_waiter_wait(&w);
	double dt = now_ms() - t0;
	cr_assert_eq(rc, -ETIMEDOUT);
	cr_assert(dt >= 390 && dt < 3000, "failed after %.0f ms", dt);
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_ping(p, 300, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), -ETIMEDOUT);

	xport_waiter_destroy(&w);
	xport_close(p);
	xport_server_close(srv);
	xport_loop_destroy(cl);
	xport_loop_destroy(sl);
	for (int i = 0; i < N; i++)
		free(dst[i]);
	free(mem);
	if (!have_netem)
		cr_log_info("tc netem is not available in this kernel: ran without delay/loss");
}

Test(netns, netem_delay_and_loss)
{
	if (!have_ns)
		cr_skip_test("cannot create network namespaces here (needs root and `ip netns`)");
	if (!have_netem) {
		teardown();
		cr_skip_test("tc netem (sch_netem) is not available in this kernel");
	}
	uint8_t *mem = malloc(4u << 20);
	memset(mem, 0x42, 4u << 20);
	xport_loop *sl, *cl;
	cr_assert_eq(xport_loop_create(&sl), 0);
	cr_assert_eq(xport_loop_create(&cl), 0);
	xport_server *srv = listen_in_ns(sl, mem);
	xport_peer *p;
	cr_assert_eq(xport_tcp_connect(cl, peer_ip, srv->port, NULL, &p), 0);
	/* 5 ms each way: a ping takes at least 10 ms. */
	xport_waiter w;
	xport_waiter_init(&w);
	double t0 = now_ms();
	xport_waiter_add(&w, 1);
	cr_assert_eq(xport_ping(p, 5000, xport_waiter_cb, &w), 0);
	cr_assert_eq(xport_waiter_wait(&w), 0);
	cr_assert(now_ms() - t0 >= 9.5);
	xport_waiter_destroy(&w);
	xport_close(p);
	xport_server_close(srv);
	xport_loop_destroy(cl);
	xport_loop_destroy(sl);
	free(mem);
}
