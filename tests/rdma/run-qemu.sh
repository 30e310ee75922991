#!/usr/bin/env bash
# Runs the RDMA verbs tests for real, on a machine without RDMA hardware: boots
# Debian's stock kernel under QEMU in pure emulation (TCG; no KVM needed) with
# soft-RoCE (rdma_rxe), from an initramfs built here, and reads the guest's serial
# console. The last line is the guest's "N passed, N failed". Exits non-zero if
# anything failed or the guest never printed its summary (docs/rdma.md).
#
#   tests/rdma/run-qemu.sh TEST_BINARY... [--cluster CLUSTER_TEST... DAEMON...]
#
# TEST_BINARY programs go to /tests and run one node and two nodes (init.sh). What
# follows --cluster goes to /cluster with its ldd closure: the programs named test_*
# run once, with KVMESH_BIN_DIR=/cluster so that they find the daemons (the other
# files: kvmesh-coordinator, kvmesh-agent) and start a cluster inside the guest.
#
# Environment:
#   RDMA_VM_DIR      work and cache folder (default build/rdma-vm); downloaded .debs
#                    stay in $RDMA_VM_DIR/debs and are re-used, so only the first run
#                    needs the network
#   RDMA_VM_TIMEOUT  seconds before the guest is killed (default 300)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
vm=${RDMA_VM_DIR:-build/rdma-vm}
timeout_s=${RDMA_VM_TIMEOUT:-300}
[ $# -ge 1 ] || { echo "usage: $0 TEST_BINARY... [--cluster CLUSTER_TEST... DAEMON...]" >&2; exit 2; }
tests=() cluster=() into=tests
for b in "$@"; do
	if [ "$b" = "--cluster" ]; then
		into=cluster
		continue
	fi
	[ -x "$b" ] || { echo "run-qemu: $b: not an executable" >&2; exit 2; }
	if [ "$into" = tests ]; then tests+=("$b"); else cluster+=("$b"); fi
done
for tool in qemu-system-x86_64 cpio dpkg-deb gzip apt-get ldd; do
	command -v "$tool" >/dev/null || { echo "run-qemu: $tool not found (deploy/deps.sh installs it)" >&2; exit 2; }
done

t_start=$(date +%s)
mkdir -p "$vm/debs"
vm=$(cd "$vm" && pwd)
log() { echo "run-qemu: $*"; }

# --- 1. the kernel and busybox packages, downloaded once --------------------------
# The kernel is the package linux-image-amd64 depends on (linux-image-<abi>-amd64),
# fetched with apt-get download (never installed on the host).
download() { # PACKAGE: download into $vm/debs, running apt-get update first if needed
	(cd "$vm/debs" && apt-get download "$1" >/dev/null 2>&1) && return 0
	log "apt-get download $1 failed; running apt-get update and retrying"
	local sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	$sudo apt-get update -qq
	# As root apt warns that _apt cannot write here; the download still succeeds.
	(cd "$vm/debs" && apt-get download "$1" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
	ls "$vm/debs/${1}_"*.deb >/dev/null 2>&1
}

kernel_deb=$(ls "$vm"/debs/linux-image-*-amd64_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$kernel_deb" ]; then
	kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
	if [ -z "$kpkg" ]; then
		sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
		log "apt-cache does not know linux-image-amd64; running apt-get update"
		$sudo apt-get update -qq
		kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
	fi
	[ -n "$kpkg" ] || { log "cannot find the kernel package linux-image-amd64 depends on"; exit 2; }
	log "downloading $kpkg"
	download "$kpkg"
	kernel_deb=$(ls "$vm"/debs/"$kpkg"_*.deb | head -n1)
fi
bb_deb=$(ls "$vm"/debs/busybox-static_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$bb_deb" ]; then
	log "downloading busybox-static"
	download busybox-static
	bb_deb=$(ls "$vm"/debs/busybox-static_*.deb | head -n1)
fi

# --- 2. what the guest needs from them, extracted once per package version --------
# Only vmlinuz, the modules and busybox are kept: the top-level Makefile includes
# every *.d under build/ as a dependency file, and unpacked packages are full of
# folders named like that (etc/libibverbs.d, conf-hooks.d). For the same reason the
# initramfs root is assembled in a temporary folder outside build/.
mods="crc32_generic udp_tunnel ip6_udp_tunnel ib_core ib_uverbs rdma_rxe veth"
boot="$vm/boot"
stamp="$(basename "$kernel_deb") $(basename "$bb_deb") $mods"
if [ ! -f "$boot/stamp" ] || [ "$(cat "$boot/stamp")" != "$stamp" ]; then
	rm -rf "$boot" && mkdir -p "$boot/modules"
	tmp=$(mktemp -d)
	dpkg-deb -x "$kernel_deb" "$tmp/k"
	dpkg-deb -x "$bb_deb" "$tmp/b"
	cp "$tmp"/k/boot/vmlinuz-* "$boot/vmlinuz"
	cp "$tmp/b/bin/busybox" "$boot/busybox"
	# The guest's busybox insmod cannot decompress: decompress here.
	for m in $mods; do
		f=$(find "$tmp"/k/lib/modules -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)
		[ -n "$f" ] || { log "module $m not found in $(basename "$kernel_deb")"; rm -rf "$tmp"; exit 2; }
		case "$f" in
		*.xz) xz -dc "$f" >"$boot/modules/$m.ko" ;;
		*.zst) zstd -qdc "$f" >"$boot/modules/$m.ko" ;;
		*.gz) gzip -dc "$f" >"$boot/modules/$m.ko" ;;
		*) cp "$f" "$boot/modules/$m.ko" ;;
		esac
	done
	rm -rf "$tmp"
	echo "$stamp" >"$boot/stamp"
fi
log "kernel $(basename "$kernel_deb"), $(basename "$bb_deb")"

# --- 3. the initramfs ---------------------------------------------------------------
root=$(mktemp -d "${TMPDIR:-/tmp}/kvmesh-rdma-root.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,etc/libibverbs.d,lib/modules,proc,sys,dev,tmp,run,var/run/netns,tests,cluster}
# Debian 12 is /usr-merged: ldd names /lib/x86_64-linux-gnu/..., the ELF interpreter is
# /lib64/ld-linux-x86-64.so.2, and the rxe provider is looked up under /usr/lib.
ln -s usr/lib64 "$root/lib64"
ln -s ../usr/lib/x86_64-linux-gnu "$root/lib/x86_64-linux-gnu"
cp "$boot/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
	[ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
cp "$boot"/modules/*.ko "$root/lib/modules/"
echo "$mods" >"$root/lib/modules/order"

# Copies FILE (following links) into the root under its own path, /lib and /lib64
# mapped into /usr as on the host.
put() {
	local src=$1 dst=$1
	case "$dst" in
	/lib/* | /lib64/*) dst=/usr$dst ;;
	esac
	mkdir -p "$root$(dirname "$dst")"
	rm -f "$root$dst" # never write through a busybox applet link
	cp -L "$src" "$root$dst"
}
# Every shared library FILE needs, as ldd resolves them on the host.
put_libs() {
	ldd "$1" 2>/dev/null | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
		[ -e "$root/usr$lib" ] || [ -e "$root$lib" ] || put "$lib"
	done
}

put_with_libs() {
	put "$1"
	put_libs "$1"
}
put_with_libs /usr/bin/rdma
put_with_libs /usr/sbin/ip
provider=$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so | head -n1) || {
	log "rxe provider not found (install ibverbs-providers)"; exit 2; }
put_with_libs "$provider"
cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"
for b in ${tests[@]+"${tests[@]}"}; do
	put_libs "$b"
	cp -L "$b" "$root/tests/"
done
for b in ${cluster[@]+"${cluster[@]}"}; do
	put_libs "$b"
	cp -L "$b" "$root/cluster/"
done
# gRPC (the daemons' control plane) resolves only IP literals in the guest; give
# its resolver the files it reads anyway.
printf '127.0.0.1 localhost\n' >"$root/etc/hosts"
: >"$root/etc/resolv.conf"
cp "$here/init.sh" "$root/init"
chmod 755 "$root/init"

initrd="$vm/initrd.gz"
(cd "$root" && find . | cpio -o -H newc -R +0:+0 --quiet | gzip -1) >"$initrd"
log "initramfs $(du -h "$initrd" | cut -f1) built in $(($(date +%s) - t_start)) s; booting (timeout ${timeout_s} s)"

# --- 4. boot and read the serial console ------------------------------------------
console="$vm/console.log"
t_boot=$(date +%s)
set +e
timeout --foreground -k 5 "$timeout_s" \
	qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 1024 -smp 2 \
	-nographic -no-reboot -nic none -monitor none \
	-kernel "$boot/vmlinuz" -initrd "$initrd" \
	-append "console=ttyS0 panic=-1 quiet" </dev/null 2>&1 |
	tr -d '\r' | tee "$console" | sed -u 's/^/guest| /'
qemu_rc=${PIPESTATUS[0]}
set -e
log "guest ran $(($(date +%s) - t_boot)) s (total $(($(date +%s) - t_start)) s), qemu exit $qemu_rc"
[ "$qemu_rc" -eq 124 ] && log "guest killed after ${timeout_s} s"

summary=$(sed -n 's/^== guest summary: //p' "$console" | tail -n1)
if [ -z "$summary" ]; then
	log "the guest printed no summary (see $console)"
	echo "0 passed, 1 failed"
	exit 1
fi
echo "$summary"
failed=$(echo "$summary" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
passed=$(echo "$summary" | sed -n 's/^\([0-9]*\) passed.*/\1/p')
[ "${failed:-1}" -eq 0 ] && [ "${passed:-0}" -gt 0 ]
