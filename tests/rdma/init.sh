#!/bin/sh
# /init of the emulated machine of `make test-rdma` (tests/rdma/run-qemu.sh packs it
# with static busybox, iproute2's ip and rdma, the kernel modules and the tests).
# Sets up soft-RoCE, runs the tests one node and two nodes, prints
# "== guest summary: N passed, N failed" and powers off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# Debian's static busybox runs its own applets before searching PATH, and its ip
# knows neither netns nor rdma: name iproute2's tools by their full paths.
IP=/usr/sbin/ip
RDMA=/usr/bin/rdma
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /var/run
mkdir -p /var/run/netns
echo "guest: up after $(cut -d' ' -f1 /proc/uptime) s"

passed=0 failed=0
fail() { echo "guest: FAIL $*"; failed=$((failed + 1)); }
finish() {
	echo "== guest summary: $passed passed, $failed failed"
	sync
	poweroff -f
}

# Order matters: without crc32_generic (rxe's ICRC), `rdma link add` fails with
# "No such file or directory".
for m in $(cat /lib/modules/order); do
	insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
[ "$failed" -eq 0 ] || finish

$IP link set lo up
# Two rxe devices on the two ends of one veth pair: rxe0 on veth0 (10.0.0.1) for this
# "node", rxe1 on veth1 (10.0.0.2) for the other.
#
# Why not the other end in its own network namespace: the 6.1 kernel's rxe opens its
# UDP port 4791 socket and routes in the initial namespace only (per-namespace rxe
# came with later kernels), so RoCE packets reaching veth1 inside another namespace
# are dropped: the QPs connect, then every request times out. So both ends stay
# here, and policy routing sends their traffic over the wire instead of via lo (the
# default route to a local address, on which rxe finds no device): the local table
# moves behind rules that route by outgoing interface, and both ends accept packets
# whose source is a local address.
$IP link add veth0 type veth peer name veth1
$IP addr add 10.0.0.1/24 dev veth0
$IP addr add 10.0.0.2/24 dev veth1
# Jumbo frames, so that rxe uses a 4096-byte RoCE MTU (fewer packets per block), and a
# long backlog: a burst of READ responses overflows the default 1000 packets of
# netdev_max_backlog, and every drop costs a 268 ms retransmission timeout.
$IP link set veth0 mtu 9000
$IP link set veth1 mtu 9000
sysctl -qw net.core.netdev_max_backlog=30000
$IP link set veth0 up
$IP link set veth1 up
for c in all veth0 veth1; do
	sysctl -qw net.ipv4.conf.$c.accept_local=1 net.ipv4.conf.$c.rp_filter=0 || fail "sysctl $c"
done
$IP route add 10.0.0.2/32 dev veth0 src 10.0.0.1 table 100
$IP route add 10.0.0.1/32 dev veth1 src 10.0.0.2 table 101
$IP rule add pref 10 oif veth0 table 100
$IP rule add pref 11 oif veth1 table 101
$IP rule add pref 100 table local
$IP rule del pref 0 table local || fail "ip rule"

# The peer process of the two-node case runs in its own network namespace, node2,
# reached for the out-of-band exchange (QPN, PSN, GID, rkey, address) over TCP on a
# second veth pair, as the transport's HELLO will be. RDMA devices are shared
# between namespaces (`rdma system` netns mode "shared"), so it still opens rxe1.
$IP netns add node2 || fail "ip netns add"
$IP link add ctl0 type veth peer name ctl1
$IP link set ctl1 netns node2
$IP addr add 10.1.0.1/24 dev ctl0
$IP link set ctl0 up
$IP netns exec node2 $IP addr add 10.1.0.2/24 dev ctl1
$IP netns exec node2 $IP link set ctl1 up
$IP netns exec node2 $IP link set lo up

# The GIDs follow the addresses: add rxe after the addresses are there.
$RDMA link add rxe0 type rxe netdev veth0 || fail "rdma link add rxe0"
$RDMA link add rxe1 type rxe netdev veth1 || fail "rdma link add rxe1"
$RDMA link show
[ "$failed" -eq 0 ] || finish

# Adds the "N passed, N failed" line of a test run's output to the totals.
count() { # LOGFILE RC
	line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -n1)
	if [ -z "$line" ]; then
		fail "$(basename "$1" .log): no summary (exit $2)"
		return
	fi
	p=${line%% passed*}
	f=${line#*passed, }
	f=${f%% failed*}
	passed=$((passed + p))
	failed=$((failed + f))
	[ "$2" -eq 0 ] || [ "$f" -ne 0 ] || fail "$(basename "$1" .log): exit $2"
}

for t in /tests/*; do
	name=$(basename "$t")
	echo "guest: === $name, one node (two processes on rxe0)"
	timeout 150 "$t" --dev rxe0 --netdev veth0 --tag one-node >/tmp/$name-one.log 2>&1
	rc=$?
	cat /tmp/$name-one.log
	count /tmp/$name-one.log $rc

	echo "guest: === $name, two nodes (rxe0 on veth0 here, rxe1 on veth1 for a peer in namespace node2)"
	$IP netns exec node2 timeout 150 "$t" --serve 7471 --dev rxe1 >/tmp/$name-peer.log 2>&1 &
	peer=$!
	timeout 150 "$t" --connect 10.1.0.2:7471 --dev rxe0 --netdev veth0 --tag two-node >/tmp/$name-two.log 2>&1
	rc=$?
	cat /tmp/$name-two.log
	count /tmp/$name-two.log $rc
	# Normally gone already (the last test kills it); a failed client must not leave
	# it waiting in accept() until its timeout.
	kill $peer 2>/dev/null
	wait $peer
	sed 's/^/peer| /' /tmp/$name-peer.log
done
# The real daemons: a coordinator and three agents, started by the test program
# from /cluster (KVMESH_BIN_DIR), gRPC on loopback, the agents' data servers on
# veth0's address so that they serve and dial over rxe0 (the device holding it),
# except agent-3 on veth1's (rxe1): agent-1 <-> agent-2 is two processes on one rxe
# device, agent-1 <-> agent-3 crosses the veth pair between two devices.
for t in /cluster/test_*; do
	[ -x "$t" ] || continue
	name=$(basename "$t")
	echo "guest: === $name, a coordinator and three agents, data plane on 10.0.0.1 (rxe0) and 10.0.0.2 (rxe1)"
	KVMESH_BIN_DIR=/cluster KVMESH_KEEP_LOGS=1 TMPDIR=/tmp timeout 240 "$t" --data-host 10.0.0.1 \
		--data-host3 10.0.0.2 --expect rdma --rdma on >/tmp/$name.log 2>&1
	rc=$?
	cat /tmp/$name.log
	count /tmp/$name.log $rc
	# The daemons' logs are kept (KVMESH_KEEP_LOGS): under SAN=... a sanitizer
	# report of a daemon, at exit included, fails the run.
	nlogs=0
	for l in /tmp/kvmesh-demo-*/*.log; do
		[ -f "$l" ] || continue
		nlogs=$((nlogs + 1))
		if grep -q "Sanitizer\|runtime error" "$l"; then
			fail "$name: sanitizer report in $l"
			cat "$l"
		fi
	done
	echo "guest: $nlogs daemon logs checked for sanitizer reports"
done
echo "guest: tests done after $(cut -d' ' -f1 /proc/uptime) s"
[ "$failed" -eq 0 ] || dmesg | tail -n 30
finish
