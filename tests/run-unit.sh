#!/usr/bin/env bash
# Runs every Criterion suite in DIR, each in its own process, and ends with one
# line "N passed, N failed, N skipped". Exits non-zero if anything failed.
#   tests/run-unit.sh DIR [criterion options...]
set -u
dir=${1:?usage: run-unit.sh DIR [criterion options]}
shift
tap_dir=$(mktemp -d)
trap 'rm -rf "$tap_dir"' EXIT

passed=0 failed=0 skipped=0 broken=()
for bin in "$dir"/test_*; do
  [ -x "$bin" ] && [ "${bin##*.}" != "d" ] && [ "${bin##*.}" != "o" ] || continue
  name=$(basename "$bin")
  tap="$tap_dir/$name.tap"
  start=$(date +%s)
  "$bin" --tap="$tap" "$@" >"$tap_dir/$name.log" 2>&1
  rc=$?
  p=$(grep -cE '^ok ' "$tap" 2>/dev/null) || true
  s=$(grep -cE '^ok .*# SKIP' "$tap" 2>/dev/null) || true
  f=$(grep -cE '^not ok ' "$tap" 2>/dev/null) || true
  p=$((p - s))
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
    f=1   # the suite died or failed outside any test: count it once
  fi
  passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
  printf '%-28s %4d passed %4d failed %4d skipped  (%ss)\n' "$name" "$p" "$f" "$s" $(( $(date +%s) - start ))
  grep -E '^ok .*# SKIP' "$tap" 2>/dev/null | sed 's/^ok - /    skipped: /'
  if [ "$f" -ne 0 ]; then
    broken+=("$name")
    sed 's/^/    | /' "$tap_dir/$name.log"
  fi
done

[ ${#broken[@]} -eq 0 ] || echo "failing suites: ${broken[*]}"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ] && [ $((passed + skipped)) -gt 0 ]
