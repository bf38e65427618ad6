#!/usr/bin/env bash
# The multi-GPU part of the GPU suite (needs 2 GPUs: nvidia-h100-x2):
#   bash tests/gpu/multi/run.sh     (after cargo build --release)
set -u
cd "$(dirname "$0")/../../.." || exit 2
export PYTHONPATH=$PWD/python:$PWD/examples:$PWD/tests/gpu TESSERA_LIB=${TESSERA_LIB:-$PWD/target/release/libtessera.so}
OUT=${OUT:-/tmp/tessera_out}; mkdir -p "$OUT"
nvidia-smi -L
fail=0; rows=()
for t in t_two_devices t_ddp; do
  t0=$SECONDS
  if timeout 600 python3 tests/gpu/multi/$t.py >"$OUT/$t.log" 2>&1; then r=PASS; else r=FAIL; fail=1; tail -20 "$OUT/$t.log"; fi
  rows+=("$(printf '%-14s | %-5s | %4ss | %s' "$t" "$r" "$((SECONDS - t0))" "$(grep -a '^NOTE: ' "$OUT/$t.log" | tail -1 | cut -c7-)")")
done
printf '%s\n' "${rows[@]}" | tee "$OUT/multi_summary.txt"
exit $fail
