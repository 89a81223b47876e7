#!/bin/bash
# mxq eval without a scheduler: mpirun on this node (see jobs/mxq_mpirun.sh).
#
#   jobs/eval_mpirun.sh RANKS MODEL_DIR TOKENS.h5 [more mxq eval options]
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: jobs/eval_mpirun.sh RANKS MODEL_DIR TOKENS.h5 [mxq eval options]" >&2
  exit 2
fi
exec "$(dirname "${BASH_SOURCE[0]}")/mxq_mpirun.sh" "$1" eval --model "$2" --tokens "$3" "${@:4}"
