#!/usr/bin/env bash
# Runs every test program in the given folders, each in its own process, and
# ends with one line "N passed, N failed, N skipped"; exits non-zero if
# anything failed or nothing ran.
#   test_*    Criterion suites: counted from their TAP report
#   stress_*  plain programs: counted from their own "N passed, N failed" line
#             (", N skipped" and "skip WHY" lines as the Python tests print them)
#   test_*.py integration tests run by /usr/bin/python3, counted the same way
# Extra arguments after "--" go to the Criterion suites.
set -u
dirs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do dirs+=("$1"); shift; done
[ $# -gt 0 ] && shift
[ ${#dirs[@]} -gt 0 ] || { echo "usage: run-unit.sh DIR... [-- criterion options]" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

passed=0 failed=0 skipped=0 broken=()
count() { grep -cE "$1" "$2" 2>/dev/null || true; }
for dir in "${dirs[@]}"; do
  for bin in "$dir"/test_* "$dir"/stress_*; do
    case "$bin" in *.o|*.d|*.pyc) continue ;; esac
    [ -f "$bin" ] && [ -x "$bin" ] || continue
    name=$(basename "$bin")
    log="$work/$name.log"
    start=$(date +%s)
    if [[ $name == *.py ]]; then
      (cd "$(dirname "$bin")" && /usr/bin/python3 "./$name") >"$log" 2>&1
      rc=$?
      line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
      p=$(echo "$line" | sed -nE 's/^([0-9]+) passed.*/\1/p'); p=${p:-0}
      f=$(echo "$line" | sed -nE 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/p'); f=${f:-0}
      s=$(echo "$line" | sed -nE 's/.*, ([0-9]+) skipped.*/\1/p'); s=${s:-0}
      grep -E '^skip ' "$log" | sed 's/^skip /    skipped: /'
    elif [[ $name == test_* ]]; then
      tap="$work/$name.tap"
      "$bin" --tap="$tap" "$@" >"$log" 2>&1
      rc=$?
      p=$(count '^ok ' "$tap"); s=$(count '^ok .*# SKIP' "$tap"); f=$(count '^not ok ' "$tap")
      p=$((p - s))
    else
      "$bin" >"$log" 2>&1
      rc=$?
      line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
      p=$(echo "$line" | sed -nE 's/^([0-9]+) passed.*/\1/p'); p=${p:-0}
      f=$(echo "$line" | sed -nE 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/p'); f=${f:-0}
      s=$(echo "$line" | sed -nE 's/.*, ([0-9]+) skipped.*/\1/p'); s=${s:-0}
      grep -E '^skip ' "$log" | sed 's/^skip /    skipped: /'
    fi
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
      f=1   # died, or failed outside any test: count it once
    fi
    passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
    printf '%-28s %4d passed %4d failed %4d skipped  (%ss)\n' "$name" "$p" "$f" "$s" $(( $(date +%s) - start ))
    [[ $name == test_* && $name != *.py ]] && grep -E '^ok .*# SKIP' "$tap" 2>/dev/null | sed 's/^ok - /    skipped: /'
    if [ "$f" -ne 0 ]; then
      broken+=("$name")
      sed 's/^/    | /' "$log"
    fi
  done
done

# Why each one failed, again at the end: CI shows only the last lines.
for name in "${broken[@]}"; do
  echo "why $name failed:"
  grep -E -A4 'Assertion Failed|\[FAIL\]|CRASH|^not ok|^FAIL|Traceback|Error' "$work/$name.log" | head -n 40 | sed 's/^/    | /'
  tail -n 5 "$work/$name.log" | sed 's/^/    | /'
done
[ ${#broken[@]} -eq 0 ] || echo "failing: ${broken[*]}"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ] && [ $((passed + skipped)) -gt 0 ]
