#!/usr/bin/env bash
# GPTQ of llama-2-70b's down_proj ([8192, 28672]) at group size 1 (one rank,
# LAPACK, 2 threads) and group size 2 (a 2-rank ScaLAPACK grid, 1 thread
# each), in one run, with the values compared. Any extra arguments go to
# both runs (e.g. --out 1024 --in 4096 for a quick look).
#   bash bench/bench_gptq_grid.sh [--build DIR] [bench_gptq_grid options]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
build="$here/build"
if [ "${1:-}" = "--build" ]; then build="${2:?--build needs a directory}"; shift 2; fi
bin="$build/bench/bench_gptq_grid"
[ -x "$bin" ] || { echo "bench_gptq_grid.sh: $bin not built (meson compile -C $build)" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
q="$(mktemp /tmp/mxq-gptq-grid.XXXXXX)"
trap 'rm -f "$q"' EXIT
echo "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset}; $(nproc) cores; $(date -u +%FT%TZ)"
mpirun -n 1 --bind-to none "$bin" --threads 2 --hessian root --save "$q" "$@"
mpirun -n 2 --bind-to none "$bin" --threads 1 --hessian root --compare "$q" "$@"
