/* The RDMA verbs layer on a machine without RDMA (the build machines): opening a
 * device fails with -ENODEV and says why, instead of crashing or hanging. The verbs
 * themselves are tested for real by `make test-rdma` (tests/rdma/). Also the peer
 * description's wire encoding, which needs no device. */
#include "common/kvm_error.h"
#include "transport/rdma.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <stdbool.h>
#include <string.h>

/* True if the kernel shows any RDMA device (then the host path cannot be tested). */
static bool host_has_rdma(void)
{
	DIR *d = opendir("/sys/class/infiniband");
	if (!d)
		return false;
	bool any = false;
	struct dirent *e;
	while ((e = readdir(d)))
		any = any || e->d_name[0] != '.';
	closedir(d);
	return any;
}

Test(rdma_host, open_without_device_is_enodev_with_message)
{
	if (host_has_rdma())
		cr_skip_test(
		        "this machine has an RDMA device; the no-device path is not reachable");
	struct xrdma_dev *dev = (struct xrdma_dev *)0x1;
	char msg[XRDMA_ERRLEN] = "";
	int rc = xrdma_dev_open(NULL, &dev, msg, sizeof(msg));
	cr_assert_eq(rc, -ENODEV, "rc=%d (%s)", rc, kvm_strerror(rc));
	cr_assert(strstr(msg, "no RDMA device present") != NULL, "message: %s", msg);
	cr_assert_eq(dev, (struct xrdma_dev *)0x1, "*out must be untouched on failure");
}

Test(rdma_host, open_by_unknown_name_is_enodev_naming_it)
{
	struct xrdma_dev *dev = NULL;
	char msg[XRDMA_ERRLEN] = "";
	int rc = xrdma_dev_open("kvmesh-no-such-dev9", &dev, msg, sizeof(msg));
	cr_assert_eq(rc, -ENODEV, "rc=%d (%s)", rc, kvm_strerror(rc));
	cr_assert_null(dev);
	cr_assert(strstr(msg, "no RDMA device") != NULL, "message: %s", msg);
	if (host_has_rdma())
		cr_assert(strstr(msg, "kvmesh-no-such-dev9") != NULL, "message: %s", msg);
}

Test(rdma_host, open_tolerates_null_message_buffer)
{
	struct xrdma_dev *dev = NULL;
	int rc = xrdma_dev_open("kvmesh-no-such-dev9", &dev, NULL, 0);
	cr_assert_eq(rc, -ENODEV);
}

Test(rdma_host, peer_description_round_trips_little_endian)
{
	struct xrdma_peer p = {.qpn = 0x123456,
	                       .psn = 0xabcdef,
	                       .lid = 0x0102,
	                       .mtu = 3,
	                       .rkey = 0xdeadbeef,
	                       .addr = 0x00007f0011223344ull,
	                       .len = 17u << 20};
	for (int i = 0; i < 16; i++)
		p.gid[i] = (uint8_t)(0xa0 + i);
	uint8_t buf[XRDMA_PEER_WIRE_SIZE];
	xrdma_peer_pack(&p, buf);
	cr_assert_eq(buf[0], 0x56);
	cr_assert_eq(buf[2], 0x12);
	cr_assert_eq(buf[28], 0xef);
	cr_assert_eq(buf[31], 0xde);
	struct xrdma_peer q;
	cr_assert_eq(xrdma_peer_unpack(&q, buf, sizeof(buf)), 0);
	cr_assert_eq(q.qpn, p.qpn);
	cr_assert_eq(q.psn, p.psn);
	cr_assert_eq(q.lid, p.lid);
	cr_assert_eq(q.mtu, p.mtu);
	cr_assert_eq(q.rkey, p.rkey);
	cr_assert_eq(q.addr, p.addr);
	cr_assert_eq(q.len, p.len);
	cr_assert_arr_eq(q.gid, p.gid, 16);
}

Test(rdma_host, peer_description_rejects_bad_input)
{
	struct xrdma_peer p = {.qpn = 5, .psn = 7, .mtu = 3, .rkey = 1, .addr = 4096, .len = 4096};
	uint8_t buf[XRDMA_PEER_WIRE_SIZE];
	struct xrdma_peer q;
	xrdma_peer_pack(&p, buf);
	cr_assert_eq(xrdma_peer_unpack(&q, buf, sizeof(buf) - 1), -EMSGSIZE);
	cr_assert_eq(xrdma_peer_unpack(&q, buf, sizeof(buf) + 1), -EMSGSIZE);

	p.qpn = 1u << 24; /* QPNs are 24-bit */
	xrdma_peer_pack(&p, buf);
	cr_assert_eq(xrdma_peer_unpack(&q, buf, sizeof(buf)), -EINVAL);

	p.qpn = 5;
	p.addr = UINT64_MAX - 10; /* region wrapping around the address space */
	xrdma_peer_pack(&p, buf);
	cr_assert_eq(xrdma_peer_unpack(&q, buf, sizeof(buf)), -EINVAL);

	p.addr = 4096;
	p.mtu = 9; /* not an enum ibv_mtu */
	xrdma_peer_pack(&p, buf);
	cr_assert_eq(xrdma_peer_unpack(&q, buf, sizeof(buf)), -EINVAL);
}

/* The RDMA backend of the data plane (transport/rdma_xport.h) on the host: what can
 * be checked without a device. Its data path runs in the guest (`make test-rdma`,
 * tests/rdma/test_rdma_xport.c). */
#include "transport/rdma_xport.h"

Test(rdma_xport_host, generic_entries_need_the_verbs_cfg)
{
	xport_peer *p = (xport_peer *)0x1;
	xport_server *s = (xport_server *)0x1;
	xport_handlers h = {0};
	cr_assert_eq(xport_connect(&xport_rdma_ops, (xport_loop *)0x1, "127.0.0.1", 1, NULL, &p), -EINVAL);
	cr_assert_eq(xport_listen(&xport_rdma_ops, (xport_loop *)0x1, "127.0.0.1", 0, NULL, &h, NULL, &s), -EINVAL);
	cr_assert_eq(xport_rdma_connect((xport_loop *)0x1, "127.0.0.1", 1, NULL, NULL, &p), -EINVAL);
	xport_rdma_cfg cfg = {0}; /* no device, no region */
	cr_assert_eq(xport_rdma_connect((xport_loop *)0x1, "127.0.0.1", 1, NULL, &cfg, &p), -EINVAL);
	cr_assert_eq(xport_rdma_listen((xport_loop *)0x1, "127.0.0.1", 0, NULL, &cfg, &h, NULL, &s), -EINVAL);
	cr_assert_eq(p, (xport_peer *)0x1, "*out must be untouched on failure");
	cr_assert_eq(s, (xport_server *)0x1, "*out must be untouched on failure");
	cr_assert_str_eq(xport_rdma_ops.name, "rdma");
}

Test(rdma_xport_host, data_path_needs_a_device)
{
	struct xrdma_dev *dev = NULL;
	char msg[XRDMA_ERRLEN] = "";
	int rc = xrdma_dev_open(NULL, &dev, msg, sizeof(msg));
	if (rc == -ENODEV)
		cr_skip_test("%s: GET by RDMA READ and PUT by RDMA WRITE are "
		             "tested in the emulated soft-RoCE machine of `make test-rdma`",
		             msg);
	/* A machine with a device: at least it opens; the two-process tests stay in
	 * tests/rdma/ (they need a peer process and a second device or namespace). */
	cr_assert_eq(rc, 0, "rc=%d (%s) %s", rc, kvm_strerror(rc), msg);
	xrdma_dev_close(dev);
}
