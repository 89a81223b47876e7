#!/bin/bash
# Any MPI verb of mxq on this node without a scheduler.
#
#   jobs/mxq_mpirun.sh RANKS VERB [mxq VERB options]
#
# Threads per rank: OPENBLAS_NUM_THREADS (default: cores / ranks).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: jobs/mxq_mpirun.sh RANKS VERB [mxq VERB options]" >&2
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
exec mpirun -n "$RANKS" --oversubscribe "$MXQ" "${@:2}"
