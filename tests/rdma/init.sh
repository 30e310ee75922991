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
$IP link add veth0 type veth peer name veth1
$IP addr add 10.0.0.1/24 dev veth0
$IP link set veth0 up
# The other end goes into its own network namespace: the second "node". Two rxe
# devices on the two ends of one veth pair in one namespace cannot reach each other
# (the route to a local address goes via lo).
$IP netns add node2 || fail "ip netns add"
$IP link set veth1 netns node2
$IP netns exec node2 $IP link set lo up
$IP netns exec node2 $IP addr add 10.0.0.2/24 dev veth1
$IP netns exec node2 $IP link set veth1 up
# The GIDs follow the addresses: add rxe after the addresses are there.
$RDMA link add rxe0 type rxe netdev veth0 || fail "rdma link add rxe0"
$IP netns exec node2 $RDMA link add rxe1 type rxe netdev veth1 || fail "rdma link add rxe1"
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
	timeout 150 "$t" --dev rxe0 --tag one-node >/tmp/$name-one.log 2>&1
	rc=$?
	cat /tmp/$name-one.log
	count /tmp/$name-one.log $rc

	echo "guest: === $name, two nodes (rxe0 here, rxe1 in namespace node2)"
	$IP netns exec node2 timeout 150 "$t" --serve 7471 --dev rxe1 >/tmp/$name-peer.log 2>&1 &
	peer=$!
	timeout 150 "$t" --connect 10.0.0.2:7471 --dev rxe0 --tag two-node >/tmp/$name-two.log 2>&1
	rc=$?
	cat /tmp/$name-two.log
	count /tmp/$name-two.log $rc
	wait $peer
	sed 's/^/peer| /' /tmp/$name-peer.log
done
echo "guest: tests done after $(cut -d' ' -f1 /proc/uptime) s"
[ "$failed" -eq 0 ] || dmesg | tail -n 30
finish
