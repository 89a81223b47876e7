#!/usr/bin/env bash
# The main job on the bundled model, set-up included. Until `mxq quantize`
# lands this measures what MX formats cost the bundled stories260K model:
# perplexity on its evaluation text (first 256 sequences) in FP32 and with
# weights rounded to nearest plus activations quantized at run time (MX block
# 32), each run pipelined over 2 MPI ranks.
#   MXQ_DEMO_RANKS   ranks (default 2)     MXQ_DEMO_LIMIT   sequences (default 256)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${MXQ_BUILD_DIR:-$ROOT/build}
export MXQ_BUILD_DIR=$BUILD
bash "$ROOT/scripts/setup.sh"

RANKS=${MXQ_DEMO_RANKS:-2}
LIMIT=${MXQ_DEMO_LIMIT:-256}
MODEL=$ROOT/data/stories260K
TOKENS=$MODEL/eval.h5
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_btl_vader_single_copy_mechanism=none
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}

run() { # label, extra eval arguments...
  local label=$1; shift
  local line
  line=$(mpirun -n "$RANKS" --oversubscribe "$BUILD/mxq" eval --model "$MODEL" --tokens "$TOKENS" \
         --limit "$LIMIT" --quiet "$@")
  printf '%-34s %s\n' "$label" "$(awk '{print $2}' <<<"$line")"
}

echo "stories260K, $LIMIT sequences of eval.h5, $RANKS ranks: perplexity"
run "FP32"                                   
run "W8A8 MXINT8 (RTN, block 32)"            --weights mxint8 --acts mxint8 --block 32
run "W4A8 MXINT4/MXINT8 (RTN, block 32)"     --weights mxint4 --acts mxint8 --block 32
run "W4A8 MXFP4/MXINT8 (RTN, block 32)"      --weights mxfp4_e2m1 --acts mxint8 --block 32
run "W3A8 MXINT3/MXINT8 (RTN, block 32)"     --weights mxint3 --acts mxint8 --block 32
