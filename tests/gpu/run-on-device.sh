#!/usr/bin/env bash
# Runs the GPU checks once on a machine with a CUDA device (a lent H200):
# builds the CUDA kernels, the GPU test and benchmark and the core library,
# runs `make test-gpu` (the test against the CPU path, then the bandwidth
# benchmark), then the benchmark alone if the test failed (so one session
# still yields figures), then a compute-sanitizer memcheck of a subset where
# the tool is present. Logs go to $OUT when set (the device tool brings them
# back), else to build/device-logs. Exits non-zero if the build or the test
# failed. About 2-4 minutes on an H200; every step has its own timeout.
#
#   bash tests/gpu/run-on-device.sh
set -u
cd "$(dirname "$0")/../.."
out=${OUT:-build/device-logs}
mkdir -p "$out"
B=build/device
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

{
  date -u
  nvidia-smi || true
  nvcc --version 2>/dev/null || /usr/local/cuda/bin/nvcc --version || true
  gcc --version | head -1
  nproc
} >"$out/env.txt" 2>&1

start=$(date +%s)
if ! make -j16 BUILD=$B cuda >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  note "build=failed seconds=$(( $(date +%s) - start ))"
  exit 1
fi
note "build=ok seconds=$(( $(date +%s) - start ))"
grep -iE 'warning' "$out/build.log" | head -20 | sed 's/^/build_warning: /' | tee -a "$summary"

# make test-gpu: the test, then (if it passed) the benchmark.
start=$(date +%s)
timeout 420 make BUILD=$B test-gpu >"$out/test-gpu.log" 2>&1
rc=$?
note "test_gpu_rc=$rc seconds=$(( $(date +%s) - start ))"
grep -E '^FAIL|passed, .* failed|^gpu_|^device=' "$out/test-gpu.log" | tee -a "$summary"

if ! grep -q '^gpu_kernel_bw_ratio_' "$out/test-gpu.log"; then
  start=$(date +%s)
  timeout 180 $B/bench/gpu_kernel >"$out/bench.log" 2>&1
  note "bench_rc=$? seconds=$(( $(date +%s) - start ))"
  grep -E '^gpu_' "$out/bench.log" | tee -a "$summary"
fi

# Out-of-range accesses and races in a few cases, where the tool works.
cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$cs" ]; then
  start=$(date +%s)
  for f in mixed/ misalign null_block short_max d512 merge/n3; do
    timeout 60 "$cs" --tool memcheck --error-exitcode 9 $B/tests/gpu/test_distattn_gpu -f "$f" \
      >>"$out/memcheck.log" 2>&1
    note "memcheck case=$f rc=$?"
  done
  timeout 60 "$cs" --tool racecheck --error-exitcode 9 $B/tests/gpu/test_distattn_gpu -f mixed/ \
    >>"$out/memcheck.log" 2>&1
  note "racecheck case=mixed/ rc=$? seconds=$(( $(date +%s) - start ))"
fi
exit $rc
