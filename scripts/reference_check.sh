#!/usr/bin/env bash
# The bundled model's perplexity on every reference token file against
# Hugging Face transformers' (data/stories260K/reference.h5, attributes of
# /ppl/<file>). The test suite checks eval.h5 and calib.h5; this also checks
# WikiText-2 (3161 sequences, about 17 s on 2 ranks), too slow for every run.
#   MXQ_BUILD_DIR  build directory (default: <repo>/build)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${MXQ_BUILD_DIR:-$ROOT/build}
export MXQ_BUILD_DIR=$BUILD
bash "$ROOT/scripts/setup.sh" >/dev/null
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_btl_vader_single_copy_mechanism=none OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
MODEL=$ROOT/data/stories260K
fails=0
for name in eval calib wikitext2_test; do
  ref=$(h5dump -a "/ppl/$name/ppl" "$MODEL/reference.h5" | awk '/\(0\)/ {print $2}')
  got=$(mpirun -n 2 --oversubscribe "$BUILD/mxq" eval --model "$MODEL" --tokens "$MODEL/$name.h5" --quiet |
        awk '/^perplexity/ {print $2}')
  verdict=$(awk -v a="$got" -v b="$ref" 'BEGIN { d = (a - b) / b; if (d < 0) d = -d; print (d <= 1e-4) ? "ok" : "FAIL" }')
  printf '%-16s mxq %-12s transformers %-12s %s\n' "$name" "$got" "$ref" "$verdict"
  [ "$verdict" = ok ] || fails=1
done
exit $fails
