#!/usr/bin/env bash
# Table 1 of Sharify et al. (2024) on the bundled stories260K: perplexity on
# eval.h5 of FP and of RTN, GPTQ, SQ, AWQ, SQ+GPTQ, AWQ+GPTQ at W8A8, W4A8,
# W3A8 MXINT and W4A8 MXFP4 (MX block 32: the model is 64 wide), calibrated
# on calib.h5 (128 sequences). Every cell is `mxq eval --recipe`, i.e. the
# model `mxq quantize` writes, quantized in memory (tests check that reloading
# the written checkpoint gives the same perplexity bit for bit).
#
#   bash bench/paper_table.sh [--ranks R] [--limit N] [--markdown]
#
# Needs a build (bash scripts/setup.sh). Prints one row per algorithm.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ranks=2 limit=0 markdown=0
while [ $# -gt 0 ]; do
  case "$1" in
    --ranks) ranks="$2"; shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    --markdown) markdown=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "paper_table.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done
mxq="${MXQ_BUILD_DIR:-$here/build}/mxq"
data="$here/data/stories260K"
recipes="$here/configs/recipes/block32"
[ -x "$mxq" ] || { echo "paper_table.sh: $mxq not built; run bash scripts/setup.sh" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export OMPI_MCA_btl_vader_single_copy_mechanism=none
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
limit_args=()
[ "$limit" -gt 0 ] && limit_args=(--limit "$limit")

ppl() { # ppl [eval args...] -> perplexity
  mpirun -n "$ranks" --oversubscribe "$mxq" eval -q --model "$data" --tokens "$data/eval.h5" "${limit_args[@]}" "$@" |
    awk '/^perplexity/ {print $2}'
}

cols=(w8a8-mxint w4a8-mxint w3a8-mxint w4a8-mxfp4)
heads=("W8A8 MXINT" "W4A8 MXINT" "W3A8 MXINT" "W4A8 MXFP4")
rows=(rtn gptq sq awq sq-gptq awq-gptq)
names=(RTN GPTQ SQ AWQ SQ+GPTQ AWQ+GPTQ)

start=$(date +%s)
fp=$(ppl)
if [ "$markdown" = 1 ]; then
  printf '| %-9s |' "method"; for h in "${heads[@]}"; do printf ' %-10s |' "$h"; done; echo
  printf '|%s|' "-----------"; for h in "${heads[@]}"; do printf '%s|' "------------"; done; echo
  printf '| %-9s |' "FP32"; for h in "${heads[@]}"; do printf ' %-10s |' "$fp"; done; echo
else
  printf '%-10s' "method"; for h in "${heads[@]}"; do printf '%12s' "$h"; done; echo
  printf '%-10s' "FP32"; for h in "${heads[@]}"; do printf '%12s' "$fp"; done; echo
fi
for i in "${!rows[@]}"; do
  line=()
  for c in "${cols[@]}"; do
    line+=("$(ppl --recipe "$recipes/$c-${rows[$i]}.yaml" --calib "$data/calib.h5")")
  done
  if [ "$markdown" = 1 ]; then
    printf '| %-9s |' "${names[$i]}"; for v in "${line[@]}"; do printf ' %-10s |' "$v"; done; echo
  else
    printf '%-10s' "${names[$i]}"; for v in "${line[@]}"; do printf '%12s' "$v"; done; echo
  fi
done
if [ "$limit" = 0 ]; then seqs="all 1379"; else seqs="first $limit"; fi
echo "(perplexity on eval.h5, $seqs sequences; calib.h5 128 x 256 tokens; $ranks ranks, OPENBLAS_NUM_THREADS=$OPENBLAS_NUM_THREADS; $(( $(date +%s) - start )) s)"
