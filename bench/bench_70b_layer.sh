#!/usr/bin/env bash
# One llama-2-70b-shaped layer quantized on 2 ranks of one node: block-128
# AWQ+GPTQ W4A8 MXINT, 32 x 512 random tokens, the layout mxq chooses by
# default (one data-parallel group; with 12 GB a rank every linear's GPTQ
# goes to the grid, so the statistics are spread). Prints the dry-run's
# plan, then the run's measured peak RSS per rank next to it, the node's
# memory, and the run's time by phase.
#
#   bash bench/bench_70b_layer.sh [--model DIR] [--work DIR]
#
# Default model: `mxq synth --preset llama-2-70b --layers 1` (2.8 GB BF16) in
# the work directory (default: a new one under $TMPDIR, removed at the end).
# Takes about 8 minutes on 2 cores and 20 GB of the node's memory. Needs a
# build and /usr/bin/python3 with h5py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="" work="" keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="${2:?--model needs a value}"; shift 2 ;;
    --work) work="${2:?--work needs a value}"; keep=1; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "bench_70b_layer.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done
build="${MXQ_BUILD_DIR:-$here/build}"
mxq="$build/mxq"
[ -x "$mxq" ] || { echo "bench_70b_layer.sh: $mxq not built; run bash scripts/setup.sh" >&2; exit 1; }
/usr/bin/python3 -c 'import h5py, numpy' 2>/dev/null || { echo "bench_70b_layer.sh: needs /usr/bin/python3 with h5py" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export OMPI_MCA_btl_vader_single_copy_mechanism=none OPENBLAS_NUM_THREADS=1
if [ -z "$work" ]; then work="$(mktemp -d "${TMPDIR:-/tmp}/mxq-70b-layer.XXXXXX")"; fi
mkdir -p "$work"
cleanup() { if [ "$keep" = 0 ]; then rm -rf "$work"; fi; }
trap cleanup EXIT
echo "# bench_70b_layer: OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-(unset)}, $(nproc) cores, $(free -m | awk '/Mem:/ {print $2}') MB, $(date -u +%FT%TZ)"
if [ -z "$model" ]; then
  model="$work/model"
  [ -f "$model/config.json" ] || "$mxq" synth --preset llama-2-70b --layers 1 --out "$model" --quiet
fi
/usr/bin/python3 - "$model/config.json" "$work/calib.h5" <<'EOF'
import json, sys, h5py, numpy as np
vocab = json.load(open(sys.argv[1]))["vocab_size"]
with h5py.File(sys.argv[2], "w") as f:
    f["tokens"] = np.random.default_rng(7).integers(0, vocab, size=(32, 512), dtype=np.int32)
EOF
sed -e 's/samples: [0-9]*/samples: 32/' "$here/configs/recipes/w4a8-mxint-awq-gptq.yaml" > "$work/recipe.yaml"
args=(quantize --model "$model" --calib "$work/calib.h5" --recipe "$work/recipe.yaml" --out "$work/out" --force)
mpirun -n 2 "$mxq" "${args[@]}" --dry-run > "$work/plan.txt" 2>&1
grep -v '^\[' "$work/plan.txt" || true
start=$(date +%s.%N)
if ! mpirun -n 2 "$mxq" "${args[@]}" > "$work/run.log" 2>&1; then
  cat "$work/run.log" >&2
  echo "bench_70b_layer.sh: the run failed" >&2
  exit 1
fi
end=$(date +%s.%N)
grep -E 'spread|layer 0|total' "$work/run.log" || true
/usr/bin/python3 - "$work/out/mxq_report.json" "$start" "$end" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"wall {float(sys.argv[3]) - float(sys.argv[2]):.1f} s")
print("rank  measured peak MB  planned MB  measured/planned")
total = 0
for k, (m, p) in enumerate(zip(r["peak_rss_mb_per_rank"], r["predicted_peak_rss_mb_per_rank"])):
    total += m
    print(f"{k:<5} {m:16.0f} {p:11.0f} {m / p:17.3f}")
print(f"both ranks: {total:.0f} MB")
layer = r["layers"][0]
print("phases (s): calibration %.1f, " % layer["seconds_calib"] +
      ", ".join(f"{k} {v:.1f}" for k, v in layer["seconds_of_quantize"].items()))
EOF
