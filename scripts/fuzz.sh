#!/usr/bin/env bash
# Fuzz mxq's parsers with libFuzzer (clang, ASan, UBSan), each target for a
# bounded time. Installs clang and its runtime from Debian if missing.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET ...]
#
# Targets: one per directory of tests/fuzz/corpus/ (safetensors index config
# recipe tokens gguf; default: all), 60 s each by default. Seeds come from tests/fuzz/corpus/<target>/ and are never
# modified; what the fuzzer finds new goes to $MXQ_FUZZ_WORK/<target>/corpus
# (default: <build>/fuzz-work), crashing inputs to $MXQ_FUZZ_WORK/<target>/.
# The exit status is non-zero if any target crashed, leaked, timed out or
# tripped a sanitizer; the last line is "N passed, N failed" over targets.
#   MXQ_FUZZ_BUILD_DIR  build directory (default: <repo>/build-fuzz)
#   MXQ_FUZZ_TAP=1      report in TAP (the test suite runs it so, 30 s per target)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${MXQ_FUZZ_BUILD_DIR:-$ROOT/build-fuzz}
WORK=${MXQ_FUZZ_WORK:-$BUILD/fuzz-work}
TAP=${MXQ_FUZZ_TAP:-0}
SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
ALL=()
for d in "$ROOT"/tests/fuzz/corpus/*/; do ALL+=("$(basename "$d")"); done
if ((${#TARGETS[@]} == 0)); then
  TARGETS=("${ALL[@]}")
fi
case $SECONDS_EACH in
  ''|*[!0-9]*|0) echo "fuzz: SECONDS_PER_TARGET must be a whole number of 1 or more, not '$SECONDS_EACH'" >&2; exit 2 ;;
esac
for t in "${TARGETS[@]}"; do
  [ -d "$ROOT/tests/fuzz/corpus/$t" ] || { echo "fuzz: unknown target '$t' (targets: ${ALL[*]})" >&2; exit 2; }
done
# Lines that are not results are TAP comments in TAP mode.
say() { if [ "$TAP" = 1 ]; then sed 's/^/# /'; else cat; fi; }
if [ "$TAP" = 1 ]; then echo "1..${#TARGETS[@]}"; fi

if ! MXQ_EXTRA_PACKAGES="clang libclang-rt-14-dev" MXQ_SETUP_NO_BUILD=1 bash "$ROOT/scripts/setup.sh" 2>&1 | say; then
  # Without root to install clang: skipped with a message, except under CI.
  if [ "$TAP" = 1 ] && [ -z "${CI:-}" ]; then
    for i in "${!TARGETS[@]}"; do echo "ok $((i + 1)) - ${TARGETS[$i]} # SKIP clang/libFuzzer not installed and not installable here"; done
    exit 0
  fi
  echo "fuzz: clang and libclang-rt-14-dev are needed (Debian); installing them failed" >&2
  if [ "$TAP" = 1 ]; then for i in "${!TARGETS[@]}"; do echo "not ok $((i + 1)) - ${TARGETS[$i]}: no clang"; done; fi
  exit 1
fi
if [ ! -f "$BUILD/build.ninja" ]; then
  CC=clang meson setup "$BUILD" "$ROOT" -Dfuzz=true -Dtests=false -Dbuildtype=debugoptimized \
    -Db_sanitize=address,undefined -Db_lundef=false \
    -Dc_args="-fsanitize=fuzzer-no-link -fno-sanitize-recover=all -fno-omit-frame-pointer" 2>&1 | tail -3 | say
fi
if ! log=$(meson compile -C "$BUILD" 2>&1); then
  { echo "$log" | grep -E 'error|FAILED' || echo "$log" | tail -20; } | say
  echo "fuzz: the build in $BUILD failed" | say
  if [ "$TAP" = 1 ]; then for i in "${!TARGETS[@]}"; do echo "not ok $((i + 1)) - ${TARGETS[$i]}: not built"; done; fi
  echo "0 passed, ${#TARGETS[@]} failed" | say
  exit 1
fi

ASAN_BASE=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
passed=0 failed=0 n=0
for t in "${TARGETS[@]}"; do
  n=$((n + 1))
  bin=$BUILD/tests/fuzz/fuzz_$t
  seeds=$ROOT/tests/fuzz/corpus/$t
  ok=ok result=""
  if [ ! -x "$bin" ] || [ ! -d "$seeds" ]; then
    ok="not ok" result="unknown target (no $bin or no $seeds)"
  else
    mkdir -p "$WORK/$t/corpus"
    opts=(-max_total_time="$SECONDS_EACH" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1
          -artifact_prefix="$WORK/$t/")
    if [ -f "$ROOT/tests/fuzz/$t.dict" ]; then opts+=(-dict="$ROOT/tests/fuzz/$t.dict"); fi
    # A target with suppressions gets full stacks for every allocation, so
    # that a suppression can name a function inside a library built without
    # frame pointers (slower, but only then).
    supp=$ROOT/tests/fuzz/$t.lsan.supp
    if [ -f "$supp" ]; then
      export LSAN_OPTIONS=suppressions=$supp ASAN_OPTIONS=$ASAN_BASE:fast_unwind_on_malloc=0
    else
      unset LSAN_OPTIONS
      export ASAN_OPTIONS=$ASAN_BASE
    fi
    log=$WORK/$t/fuzz.log
    echo "fuzz: $t for ${SECONDS_EACH} s (log $log)" | say
    if "$bin" "${opts[@]}" "$WORK/$t/corpus" "$seeds" >"$log" 2>&1; then
      runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
      cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
      result="$runs inputs in ${SECONDS_EACH} s, $cov, no crash, leak or sanitizer report"
    else
      ok="not ok" result="see $log; the input is in $WORK/$t/ (crash-*, leak-*, timeout-* or oom-*)"
      { grep -m3 -E 'ERROR|SUMMARY|runtime error' "$log" || tail -5 "$log"; } | say
    fi
  fi
  if [ "$ok" = ok ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
  if [ "$TAP" = 1 ]; then echo "$ok $n - $t: $result"; else echo "${ok/not ok/FAILED} $t: $result"; fi
done
echo "$passed passed, $failed failed" | say
[ "$failed" -eq 0 ]
