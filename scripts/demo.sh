#!/usr/bin/env bash
# The main job on the bundled model, set-up included: `mxq quantize` with the
# AWQ+GPTQ W4A8 MXINT recipe (weights MXINT4, activations MXINT8, MX block 32
# because the model is 64 wide) on 2 MPI ranks, calibrated on calib.h5; then
# `mxq eval` of the FP model and of the written MX checkpoint on eval.h5,
# printed side by side.
#   MXQ_DEMO_RANKS   ranks (default 2)
#   MXQ_DEMO_LIMIT   evaluate the first N sequences (default 0 = all 1379)
#   MXQ_DEMO_RECIPE  recipe (default configs/recipes/block32/w4a8-mxint-awq-gptq.yaml)
#   MXQ_DEMO_OUT     output directory (default out/stories260K-w4a8-awq-gptq; replaced)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${MXQ_BUILD_DIR:-$ROOT/build}
export MXQ_BUILD_DIR=$BUILD
bash "$ROOT/scripts/setup.sh"

RANKS=${MXQ_DEMO_RANKS:-2}
LIMIT=${MXQ_DEMO_LIMIT:-0}
RECIPE=${MXQ_DEMO_RECIPE:-$ROOT/configs/recipes/block32/w4a8-mxint-awq-gptq.yaml}
OUT=${MXQ_DEMO_OUT:-$ROOT/out/stories260K-w4a8-awq-gptq}
MODEL=$ROOT/data/stories260K
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_btl_vader_single_copy_mechanism=none
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
limit_args=()
[ "$LIMIT" -gt 0 ] && limit_args=(--limit "$LIMIT")

mkdir -p "$(dirname "$OUT")"
mpirun -n "$RANKS" --oversubscribe "$BUILD/mxq" quantize --model "$MODEL" --calib "$MODEL/calib.h5" \
  --recipe "$RECIPE" --out "$OUT" --force
"$BUILD/mxq" verify "$OUT"

ppl() { # model dir -> perplexity
  mpirun -n "$RANKS" --oversubscribe "$BUILD/mxq" eval --model "$1" --tokens "$MODEL/eval.h5" "${limit_args[@]}" \
    --quiet | awk '/^perplexity/ {print $2}'
}
fp=$(ppl "$MODEL")
q=$(ppl "$OUT")
echo
echo "stories260K perplexity on eval.h5 ($([ "$LIMIT" -gt 0 ] && echo "first $LIMIT" || echo all) sequences, $RANKS ranks)"
printf '%-12s %-44s %s\n' "FP32" "$MODEL" "$fp"
printf '%-12s %-44s %s\n' "$(basename "$RECIPE" .yaml)" "$OUT" "$q"
awk -v a="$fp" -v b="$q" 'BEGIN { printf "change: %+.2f%%\n", 100 * (b - a) / a }'
