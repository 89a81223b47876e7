#!/usr/bin/env bash
# Install, build and run the whole test suite. The last line is
# "N passed, N failed" (N counts test cases); the exit status is non-zero if
# anything failed or the build did not succeed.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${MXQ_BUILD_DIR:-$ROOT/build}
export MXQ_BUILD_DIR=$BUILD

# The tests also need a real Slurm (slurm-wlm, munge), libFuzzer (clang) and
# llama.cpp, from npm's node-llama-cpp (Node.js 20 or later).
if ! MXQ_EXTRA_PACKAGES="slurm-wlm munge clang libclang-rt-14-dev nodejs" bash "$ROOT/scripts/setup.sh"; then
  echo "test: set-up or build failed"
  echo "0 passed, 1 failed"
  exit 1
fi
if [ ! -d "$BUILD/npm/node_modules/node-llama-cpp" ]; then
  echo "test: installing node-llama-cpp 3.21.1 (llama.cpp's CPU build) into $BUILD/npm"
  mkdir -p "$BUILD/npm"
  if ! (cd "$BUILD/npm" && npm i -E --no-audit --no-fund --omit=optional \
          node-llama-cpp@3.21.1 @node-llama-cpp/linux-x64@3.21.1 >npm-install.log 2>&1); then
    echo "test: npm install of node-llama-cpp failed (see $BUILD/npm/npm-install.log); the llama.cpp test will say so"
  fi
fi

rm -f "$BUILD/meson-logs/testlog.json"
meson test -C "$BUILD" --print-errorlogs "$@"
meson_rc=$?

if [ ! -f "$BUILD/meson-logs/testlog.json" ]; then
  echo "test: meson test produced no log"
  echo "0 passed, 1 failed"
  exit 1
fi
python3 "$ROOT/scripts/tap_summary.py" "$BUILD/meson-logs/testlog.json"
summary_rc=$?
if [ $meson_rc -ne 0 ] || [ $summary_rc -ne 0 ]; then
  exit 1
fi
exit 0
