#!/usr/bin/env bash
# The GPU suite. From the repository root, with target/release/libtessera.so built:
#   bash tests/gpu/run.sh            # logs under $OUT (default /tmp/tessera_out)
#   bash tests/gpu/run.sh smoke oom  # only the tests named
# Runs every test (each its own process, with a timeout), never stops at a failure,
# prints a table last and exits non-zero if any test failed.
# Diagnostics and benchmarks (not in the test list; run by hand, -h for options):
#   python3 tests/gpu/record_trace.py mixed|multistream|infer_varbatch OUT.trace.gz  # native-allocator trace (<1 min)
#   python3 tests/gpu/bench_frontier.py   # OOM frontier, tessera/native/expandable/async x 7 workloads (~8 min)
#   python3 tests/gpu/bench_capped.py     # GPT-2 steps/s, tessera uncapped vs memory_limit = frontier+5% (~2 min)
#   python3 tests/gpu/bench_time.py       # warm wall time of 9 workloads, tessera vs native, expandable, async (~8 min)
#   python3 tests/gpu/prof_step.py native|tessera   # where a training step's time goes (torch.profiler)
#   python3 tests/gpu/diag_growth.py native|tessera # does growing the pool wait for the GPU?
#   python3 tests/gpu/diag_train.py       # train_gpt.py steps/s and its allocator counters, per configuration (~3 min)
#   python3 tests/gpu/bench_replay.py     # the allocator's CPU time per event on a training trace, vs native (~1 min)
#   python3 tests/gpu/diag_launch.py      # kernel launch cost under each allocator, no allocation (~1 min)
#   bash tests/gpu/multi/run.sh          # two GPUs: two devices in one process, DDP under torchrun
#   python3 tests/gpu/bench_multistream.py # memory shared across streams, tessera vs native
#   python3 tests/gpu/drv_cost.py         # what one cuMemGetInfo costs (a driver call on the growth path)
# The last test, memcheck, reruns eight tests under compute-sanitizer (about 2-4 minutes).
set -u
cd "$(dirname "$0")/../.." || exit 2
ROOT=$PWD
OUT=${OUT:-/tmp/tessera_out}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT/python:$ROOT/examples${PYTHONPATH:+:$PYTHONPATH}"
export TESSERA_LIB=${TESSERA_LIB:-$ROOT/target/release/libtessera.so}
export PYTHONUNBUFFERED=1
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"  # nvcc for CMake's CUDA lookup

# --- environment ---
{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  echo "== git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
  echo "== $TESSERA_LIB"
  ls -l "$TESSERA_LIB" && ldd "$TESSERA_LIB"
  python3 -c 'import tessera_torch as t; print("tessera", t.version())'
  echo "TESSERA_CONF=${TESSERA_CONF-<unset>}"
} 2>&1 | tee "$OUT/env.log"

# --- tests ---
NAMES=() RESULTS=() SECS=() NOTES=()
FAILED=0

# run_test NAME TIMEOUT_S CMD...: run CMD with output in $OUT/NAME.log; record the outcome.
run_test() {
  local name=$1 limit=$2; shift 2
  if [ ${#SELECTED[@]} -gt 0 ] && [[ " ${SELECTED[*]} " != *" $name "* ]]; then return; fi
  echo "=== $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc
  timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1 </dev/null
  rc=$?
  local secs=$((SECONDS - t0)) result note
  note=$(grep -a '^NOTE: ' "$OUT/$name.log" | tail -n 1 | cut -c7-)
  if [ $rc -eq 0 ]; then
    result=PASS
  else
    FAILED=$((FAILED + 1))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then result=TIMEOUT; else result="FAIL($rc)"; fi
    # The last meaningful line says why (an assertion, an exception, a CMake error).
    [ -z "$note" ] && note=$(grep -av '^\s*$' "$OUT/$name.log" | tail -n 1)
    tail -n 30 "$OUT/$name.log" | sed "s/^/    [$name] /"
  fi
  echo "    -> $result in ${secs}s  $note"
  NAMES+=("$name") RESULTS+=("$result") SECS+=("$secs") NOTES+=("${note:0:140}")
}

# The LibTorch test: configure, build, run through the adaptor and as a plain plug-in
# (one step, so one line in the table).
libtorch_test() {
  local prefix build=${LIBTORCH_BUILD:-/tmp/tessera_libtorch_build}  # outside $OUT: logs only there
  prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)') || return 1
  cmake -S tests/libtorch -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
      -DTESSERA_LIBRARY="$TESSERA_LIB" ${TESSERA_INCLUDE_DIR:+-DTESSERA_INCLUDE_DIR="$TESSERA_INCLUDE_DIR"} &&
    cmake --build "$build" -j "$(nproc)" || return 1
  local mode out rc notes=""
  for mode in adaptor plain; do  # each in its own process: the allocator is chosen once
    out=$("$build/tessera_libtorch_test" "$mode"); rc=$?
    printf '%s\n' "$out" | sed 's/^NOTE: /  /'
    [ "$rc" = 0 ] || return "$rc"
    notes+="${notes:+; }$(printf '%s\n' "$out" | grep -a '^NOTE: ' | cut -c7-)"
  done
  echo "NOTE: $notes"
}
export -f libtorch_test
export OUT TESSERA_INCLUDE_DIR=${TESSERA_INCLUDE_DIR:-} LIBTORCH_BUILD=${LIBTORCH_BUILD:-}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # skip CMake's GPU arch probing

SELECTED=("$@")
# Timeouts are a few times the expected time (whole suite: about 3-5 minutes on an H100).
# First the torch adaptor, which install() uses by default: built once (cached per torch
# version, sources and library), so that no test pays for the compile.
run_test build       300 python3 -m tessera build
run_test fallback    240 python3 tests/gpu/t_fallback.py
run_test smoke       120 python3 tests/gpu/t_smoke.py
run_test train       300 python3 tests/gpu/t_train_parity.py
run_test oom         240 python3 tests/gpu/t_oom.py
run_test threads     240 python3 tests/gpu/t_threads.py
run_test threads_drv 240 env TESSERA_CONF=driver_thread:true python3 tests/gpu/t_threads.py
run_test multistream 120 python3 tests/gpu/t_multistream.py
run_test reclaim     120 python3 tests/gpu/t_reclaim.py
run_test gap         120 python3 tests/gpu/t_gap.py
run_test shutdown    120 python3 tests/gpu/t_shutdown.py
run_test graphs      180 python3 tests/gpu/t_graphs.py
run_test sleep       300 python3 tests/gpu/t_sleep.py
run_test sleep_keep  300 env TESSERA_CONF=keep_backups:true python3 tests/gpu/t_sleep.py
run_test bench       180 python3 tests/gpu/t_bench.py
run_test stats       240 python3 tests/gpu/t_stats.py
run_test viz         180 python3 tests/gpu/t_viz.py
run_test batchfinder 240 python3 tests/gpu/t_batchfinder.py
run_test oom_report  120 python3 tests/gpu/t_oom_report.py
run_test libtorch    300 bash -c libtorch_test
run_test adaptor     480 python3 tests/gpu/t_adaptor.py
run_test memcheck    420 bash tests/gpu/memcheck.sh

# --- summary ---
{
  echo
  printf '%-12s | %-9s | %7s | %s\n' test result seconds note
  printf '%-12s-+-%-9s-+-%7s-+-%s\n' ------------ --------- ------- ----
  for i in "${!NAMES[@]}"; do
    printf '%-12s | %-9s | %7s | %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
  done
  echo "${#NAMES[@]} tests, $FAILED failed; logs in $OUT"
} | tee "$OUT/summary.txt"
# The device tool returns at most 8 files: pack the logs into one.
(cd "$OUT" && tar czf logs.tgz --remove-files ./*.log 2>/dev/null)
[ "$FAILED" -eq 0 ] && [ ${#NAMES[@]} -gt 0 ]
