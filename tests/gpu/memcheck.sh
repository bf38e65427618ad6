#!/usr/bin/env bash
# compute-sanitizer memcheck over the GPU tests that exercise tessera's memory paths (a test of
# run.sh: exit 0 iff every program ran clean). Kernels touching memory tessera unmapped too early,
# or mapped without access, show up as invalid global reads/writes. Slow (10-50x): the tests run
# with their normal sizes, one process each. From the repository root, after run.sh's setup.
set -u
cd "$(dirname "$0")/../.." || exit 2
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
[ -x "$SAN" ] || { echo "NOTE: compute-sanitizer not found"; exit 1; }
TESTS=${MEMCHECK_TESTS:-"t_smoke t_multistream t_reclaim t_gap t_graphs t_threads t_oom t_oom_report"}
failed=0 summary=()
for t in $TESTS; do
  log=${OUT:-/tmp}/memcheck_$t.log
  "$SAN" --tool memcheck --leak-check no --report-api-errors no --target-processes all \
      --error-exitcode 99 python3 tests/gpu/$t.py >"$log" 2>&1
  rc=$?
  errors=$(grep -a 'ERROR SUMMARY' "$log" | tail -n 1 | grep -o '[0-9]\+ error' | grep -o '[0-9]\+')
  echo "== $t: rc $rc, ${errors:-?} errors"
  if [ $rc -ne 0 ] || [ "${errors:-1}" != 0 ]; then
    failed=$((failed + 1))
    grep -a -m 20 -E 'Invalid|ERROR|Error|error' "$log" | sed "s/^/    [$t] /"
  fi
  summary+=("$t ${errors:-?}")
done
echo "NOTE: memcheck errors: ${summary[*]}"
[ $failed -eq 0 ]
