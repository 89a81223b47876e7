#!/bin/bash
# The same job without a scheduler: mpirun on this node.
#
#   jobs/quantize_mpirun.sh RANKS MODEL_DIR CALIB.h5 RECIPE.yaml OUT_DIR [more mxq quantize options]
#
# Threads per rank: OPENBLAS_NUM_THREADS (default: cores / ranks).
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: jobs/quantize_mpirun.sh RANKS MODEL_DIR CALIB.h5 RECIPE.yaml OUT_DIR [mxq quantize options]" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MXQ=${MXQ:-$ROOT/build/mxq}
RANKS=$1
CORES=$(nproc)
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$(( CORES / RANKS > 0 ? CORES / RANKS : 1 ))}
export OMPI_MCA_btl_vader_single_copy_mechanism=none
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
mpirun -n "$RANKS" --oversubscribe "$MXQ" quantize --model "$2" --calib "$3" --recipe "$4" --out "$5" "${@:6}"
