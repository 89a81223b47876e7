#!/usr/bin/env bash
# A whole llama-2-7b-shaped model quantized on one node, timed against its
# floor measured in the same run:
#   1. `mxq synth --preset llama-2-7b` (32 layers, BF16, 13.5 GB; skipped with --model);
#   2. 32 x 512 random calibration tokens and 4 x 512 evaluation tokens;
#   3. the floor: bench_layer --floor-only at the sgemm/dgemm peaks of R threads
#      (R = ranks: each rank runs one thread), measured before and after the run;
#      the lower floor (the faster peaks) counts;
#   4. `mxq quantize --dry-run`, then the run, block-128 AWQ+GPTQ W4A8 with
#      calibration.samples 32, on R ranks;
#   5. `mxq eval --limit 4` of the written checkpoint.
# Prints the per-phase table (medians over layers), wall time / floor, and
# the peak RSS per rank (measured and predicted).
#
#   bash bench/bench_7b.sh [--ranks 2] [--work DIR] [--model DIR] [--layers N] [--keep] [--reuse]
#
# --reuse: with --work DIR holding a finished run (DIR/out/mxq_report.json), only
# measure the floor, evaluate and print the table again.
# --work (default: a new directory under $TMPDIR) holds the model, the tokens
# and the checkpoint (about 17 GB in all); it is removed at the end unless
# --keep or it was given. Needs a build and /usr/bin/python3 with h5py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ranks=2 work="" model="" layers="" keep=0 reuse=0
need_value() { [ $# -ge 2 ] || { echo "bench_7b.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --ranks) need_value "$@"; ranks="$2"; shift 2 ;;
    --work) need_value "$@"; work="$2"; keep=1; shift 2 ;;
    --model) need_value "$@"; model="$2"; shift 2 ;;
    --layers) need_value "$@"; layers="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --reuse) reuse=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "bench_7b.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done
# checked before anything costly (the synthesized model is 13.5 GB)
[[ "$ranks" =~ ^[1-9][0-9]*$ ]] || { echo "bench_7b.sh: --ranks must be a positive integer, got '$ranks'" >&2; exit 2; }
[ -z "$layers" ] || [[ "$layers" =~ ^[1-9][0-9]*$ ]] || { echo "bench_7b.sh: --layers must be a positive integer, got '$layers'" >&2; exit 2; }
[ -z "$layers" ] || [ -z "$model" ] || { echo "bench_7b.sh: --layers applies to the synthesized model, not to --model" >&2; exit 2; }
[ -z "$model" ] || [ -f "$model/config.json" ] || { echo "bench_7b.sh: --model '$model' has no config.json" >&2; exit 2; }
build="${MXQ_BUILD_DIR:-$here/build}"
mxq="$build/mxq"
[ -x "$mxq" ] && [ -x "$build/bench/bench_layer" ] || { echo "bench_7b.sh: $build not built; run bash scripts/setup.sh" >&2; exit 1; }
/usr/bin/python3 -c 'import h5py, numpy' 2>/dev/null || { echo "bench_7b.sh: needs /usr/bin/python3 with h5py and numpy (apt-get install python3-h5py)" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export OMPI_MCA_btl_vader_single_copy_mechanism=none OPENBLAS_NUM_THREADS=1
mpi=(mpirun -n "$ranks")
[ "$ranks" -gt "$(nproc)" ] && mpi+=(--oversubscribe)
if [ -z "$work" ]; then work="$(mktemp -d "${TMPDIR:-/tmp}/mxq-bench7b.XXXXXX")"; fi
mkdir -p "$work"
cleanup() { if [ "$keep" = 0 ]; then rm -rf "$work"; fi; }
trap cleanup EXIT

echo "# bench_7b: $ranks ranks, OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-(unset)}, work in $work"
if [ -z "$model" ]; then
  model="$work/model"
  if [ ! -f "$model/config.json" ]; then
    "$mxq" synth --preset llama-2-7b ${layers:+--layers "$layers"} --out "$model" --quiet
  fi
fi
/usr/bin/python3 - "$model" "$work" <<'EOF'
import json, sys, h5py, numpy as np
vocab = json.load(open(sys.argv[1] + "/config.json"))["vocab_size"]
for name, n, seed in (("calib", 32, 1), ("eval", 4, 2)):
    with h5py.File(f"{sys.argv[2]}/{name}.h5", "w") as f:
        f["tokens"] = np.random.default_rng(seed).integers(0, vocab, size=(n, 512), dtype=np.int32)
EOF
sed 's/samples: 128/samples: 32/' "$here/configs/recipes/w4a8-mxint-awq-gptq.yaml" > "$work/recipe.yaml"
grep -q "samples: 32" "$work/recipe.yaml" || { echo "bench_7b.sh: could not set samples: 32 in the recipe" >&2; exit 1; }

measure_floor() {
  local line
  line="$("$build/bench/bench_layer" --model "$model" --tokens 16384 --threads "$ranks" --floor-only \
    --only awq-gptq --recipes "$here/configs/recipes" | grep '^floor')"
  echo "# $line" >&2
  sed -E 's/.* = ([0-9.]+) s .*/\1/' <<<"$line"
}
floor_before="$(measure_floor)"

args=(--model "$model" --calib "$work/calib.h5" --recipe "$work/recipe.yaml")
if [ "$reuse" = 0 ] || [ ! -f "$work/out/mxq_report.json" ]; then
  "${mpi[@]}" "$mxq" quantize "${args[@]}" --dry-run | sed 's/^/# /'
  "${mpi[@]}" "$mxq" quantize "${args[@]}" --out "$work/out" --force 2> "$work/quantize.log" > "$work/summary.txt" \
    || { tail -20 "$work/quantize.log" >&2; exit 1; }
fi
floor_after="$(measure_floor)"
"${mpi[@]}" "$mxq" eval --model "$work/out" --tokens "$work/eval.h5" --limit 4 --json "$work/eval.json" --quiet
/usr/bin/python3 - "$work" "$floor_before" "$floor_after" <<'EOF'
import json, statistics, sys
work, floor = sys.argv[1], min(float(sys.argv[2]), float(sys.argv[3]))
rep = json.load(open(f"{work}/out/mxq_report.json"))
ev = json.load(open(f"{work}/eval.json"))
L = rep["layers"]
med = lambda key: statistics.median(l[key] for l in L)
medq = lambda key: statistics.median(l["seconds_of_quantize"][key] for l in L)
wall = rep["totals"]["seconds_total"]
print(f"\n| phase (per layer, median over {len(L)} layers) | seconds |\n|---|---:|")
print(f"| calibration: forward + statistics on a rank's share, summed onto the owner | {med('seconds_calib'):.1f} |")
for k, name in (("scales", "AWQ scale search"), ("clip", "AWQ clip"), ("gptq", "GPTQ"), ("pack", "pack"),
                ("report_loss", "report losses")):
    print(f"| {name} | {medq(k):.1f} |")
print(f"| quantize (all of the above but calibration) | {med('seconds'):.1f} |")
tot = rep["totals"]
print(f"\nwall {wall:.0f} s, mxq's own clock from start to commit (calibrate+quantize {tot['seconds_quantize']:.0f} s, "
      f"write {tot['seconds_write']:.0f} s); "
      f"floor {floor:.0f} s; **wall / floor = {wall / floor:.2f}**")
peak, pred = rep["peak_rss_mb_per_rank"], rep["predicted_peak_rss_mb_per_rank"]
print("peak RSS per rank MB: " + ", ".join(f"{p:.0f} (predicted {q:.0f}, {100 * (q - p) / p:+.0f}%)" for p, q in zip(peak, pred))
      + f"; combined {sum(peak) / 1024:.2f} GB")
print(f"eval of the checkpoint on {ev.get('sequences', 4)} sequences: perplexity {ev['ppl']:.2f}, "
      f"mean NLL {ev['mean_nll']:.4f}")
EOF
