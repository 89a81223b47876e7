#!/usr/bin/env bash
# Strong scaling of `mxq quantize` from 1 to 2 ranks (one OpenBLAS thread per
# rank, so 1 rank uses one core and 2 ranks two), measured in one run:
# the same model, tokens and recipe (block-128 AWQ+GPTQ W4A8 MXINT,
# calibration.samples 32) on 1 rank and on a data-parallel group of 2
# (--group-size 2: in fp mode the two ranks quantize alternate layers, in
# sequential mode they spread each layer's inputs). Prints wall time,
# speed-up and the per-phase medians over layers from each run's
# mxq_report.json (in sequential mode a phase's time is the longest over
# the ranks).
#
#   bash bench/bench_scaling.sh [--model DIR] [--mode fp|sequential|both] [--work DIR]
#
# Default model: `mxq synth --preset llama-2-7b --layers 2` (2 GB BF16) in the
# work directory (default: a new one under $TMPDIR, removed at the end);
# tokens: 32 x 512 random ids. Needs a build and /usr/bin/python3 with h5py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="" mode=both work="" keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="${2:?--model needs a value}"; shift 2 ;;
    --mode) mode="${2:?--mode needs a value}"; shift 2 ;;
    --work) work="${2:?--work needs a value}"; keep=1; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "bench_scaling.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done
case "$mode" in fp) modes=(fp) ;; sequential) modes=(sequential) ;; both) modes=(fp sequential) ;;
  *) echo "bench_scaling.sh: --mode must be fp, sequential or both, got '$mode'" >&2; exit 2 ;; esac
build="${MXQ_BUILD_DIR:-$here/build}"
mxq="$build/mxq"
[ -x "$mxq" ] || { echo "bench_scaling.sh: $mxq not built; run bash scripts/setup.sh" >&2; exit 1; }
/usr/bin/python3 -c 'import h5py, numpy' 2>/dev/null || { echo "bench_scaling.sh: needs /usr/bin/python3 with h5py" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export OMPI_MCA_btl_vader_single_copy_mechanism=none OPENBLAS_NUM_THREADS=1
if [ -z "$work" ]; then work="$(mktemp -d "${TMPDIR:-/tmp}/mxq-scaling.XXXXXX")"; fi
mkdir -p "$work"
cleanup() { if [ "$keep" = 0 ]; then rm -rf "$work"; fi; }
trap cleanup EXIT
echo "# bench_scaling: OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-(unset)}, $(nproc) cores, $(date -u +%FT%TZ)"
if [ -z "$model" ]; then
  model="$work/model"
  [ -f "$model/config.json" ] || "$mxq" synth --preset llama-2-7b --layers 2 --out "$model" --quiet
fi
/usr/bin/python3 - "$model/config.json" "$work/calib.h5" <<'EOF'
import json, sys, h5py, numpy as np
vocab = json.load(open(sys.argv[1]))["vocab_size"]
with h5py.File(sys.argv[2], "w") as f:
    f["tokens"] = np.random.default_rng(7).integers(0, vocab, size=(32, 512), dtype=np.int32)
EOF
for m in "${modes[@]}"; do
  sed -e "s/mode: fp/mode: $m/" "$here/configs/recipes/w4a8-mxint-awq-gptq.yaml" |
    sed -e 's/samples: [0-9]*/samples: 32/' > "$work/recipe-$m.yaml"
  for ranks in 1 2; do
    layout=()
    [ "$ranks" -gt 1 ] && layout=(--group-size 2)
    out="$work/out-$m-$ranks"
    rm -rf "$out"
    start=$(date +%s.%N)
    if ! mpirun -n "$ranks" --bind-to core "$mxq" quantize --model "$model" --calib "$work/calib.h5" \
      --recipe "$work/recipe-$m.yaml" --out "$out" "${layout[@]}" --quiet > "$work/log-$m-$ranks" 2>&1; then
      echo "bench_scaling.sh: mxq quantize ($m mode, $ranks rank(s)) failed:" >&2
      tail -n 20 "$work/log-$m-$ranks" >&2
      exit 1
    fi
    echo "$(/usr/bin/python3 -c "import time,sys; print(f'{time.time()-float(sys.argv[1]):.1f}')" "$start")" > "$out.wall"
  done
  /usr/bin/python3 - "$work" "$m" <<'EOF'
import json, statistics, sys
work, mode = sys.argv[1], sys.argv[2]
walls, rows = {}, []
for ranks in (1, 2):
    rep = json.load(open(f"{work}/out-{mode}-{ranks}/mxq_report.json"))
    walls[ranks] = float(open(f"{work}/out-{mode}-{ranks}.wall").read())
    layers = [l for l in rep["layers"] if l.get("layer", -1) >= 0]
    med = lambda f: statistics.median(f(l) for l in layers)
    q = lambda k: med(lambda l: l["seconds_of_quantize"][k])
    rows.append((ranks, walls[ranks], med(lambda l: l["seconds_calib"]), q("scales"), q("clip"), q("gptq"), q("pack"),
                 q("report_loss")))
print(f"\n{mode} mode: wall time 1 rank {walls[1]:.1f} s, 2 ranks {walls[2]:.1f} s: speed-up {walls[1] / walls[2]:.2f}x")
print("ranks  wall s  per layer (medians, s): calib  scales  clip   gptq   pack   loss")
for r in rows:
    print(f"{r[0]:<6} {r[1]:>6.1f}  {'':>27}{r[2]:>6.1f} {r[3]:>6.1f} {r[4]:>6.1f} {r[5]:>6.1f} {r[6]:>6.1f} {r[7]:>6.1f}")
EOF
done
