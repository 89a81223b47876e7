#!/bin/bash
# mxq quantize without a scheduler: mpirun on this node (see jobs/mxq_mpirun.sh).
#
#   jobs/quantize_mpirun.sh RANKS MODEL_DIR CALIB.h5 RECIPE.yaml OUT_DIR [more mxq quantize options]
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: jobs/quantize_mpirun.sh RANKS MODEL_DIR CALIB.h5 RECIPE.yaml OUT_DIR [mxq quantize options]" >&2
  exit 2
fi
exec "$(dirname "${BASH_SOURCE[0]}")/mxq_mpirun.sh" "$1" quantize --model "$2" --calib "$3" --recipe "$4" --out "$5" "${@:6}"
