#!/usr/bin/env bash
# Installs the Debian packages kvmesh needs, skipping those already present.
# Idempotent: a second run installs nothing and says so.
#   deploy/deps.sh          everything (build, tests, peers, emulated RDMA)
#   deploy/deps.sh build    only what compiling and `make test` need
set -euo pipefail

build_pkgs=(
  build-essential pkg-config make
  libgrpc-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
  libibverbs-dev librdmacm-dev ibverbs-providers
  libhwloc-dev libxxhash-dev libsystemd-dev libcriterion-dev
  libmicrohttpd-dev libyaml-dev
  python3 python3-grpcio python3-grpc-tools python3-yaml systemd
  prometheus
)
extra_pkgs=(
  clang
  etcd-server etcd-client
  python3-numpy
  redis-server libhiredis-dev
  iproute2 qemu-system-x86 cpio
)

want=("${build_pkgs[@]}")
[ "${1:-all}" = build ] || want+=("${extra_pkgs[@]}")

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all ${#want[@]} packages already installed"
  exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "deps: installing ${#missing[@]} missing packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "deps: done"
