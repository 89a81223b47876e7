#!/usr/bin/env bash
# llama.cpp itself (node-llama-cpp 3.21.1's prebuilt CPU binaries) runs what
# `mxq export --to gguf` writes: the perplexity it computes on the first 32
# sequences of eval.h5 (ppl.mjs, from its next-token probabilities at
# temperature 1) against `mxq eval` of the same checkpoint. FP exported to
# F32 within a relative 1e-4; weight-only AWQ+GPTQ checkpoints at MXINT4
# (blocks 32 and 128), MXINT8 and MXFP4 within 1% (llama.cpp quantizes
# activations its own way; the gap is printed); a GGUF whose vocabulary is
# copied with --vocab-from gives the same perplexity as its twin; the FP
# model given Llama-3 rope scaling (rope_type llama3: of its four
# frequencies at head_dim 8, one kept, one smoothed, two divided by the
# factor) exported with its rope_freqs factors, within 1e-4 again. TAP.
#   test_llama_cpp.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
BUILD=$1 ROOT=$2
MXQ=$BUILD/mxq NPM=$BUILD/npm DATA=$ROOT/data/stories260K
SEQS=32
WORK=$(mktemp -d /tmp/mxq-llama-cpp-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
CASES=(f32 mxint4:32 mxint4:128 mxint8:32 mxfp4_e2m1:32 vocab-from llama3-rope)
echo "1..${#CASES[@]}"
if ! command -v node >/dev/null || [ ! -d "$NPM/node_modules/node-llama-cpp" ]; then
  why="node or node-llama-cpp is not installed in $NPM (scripts/test.sh installs it with npm)"
  for i in "${!CASES[@]}"; do
    if [ -n "${CI:-}" ]; then echo "not ok $((i + 1)) - ${CASES[$i]}: $why"; else echo "ok $((i + 1)) - ${CASES[$i]} # SKIP $why"; fi
  done
  [ -z "${CI:-}" ]
  exit
fi
cp "$ROOT/tests/llama_cpp/ppl.mjs" "$NPM/ppl.mjs"
h5dump -d /tokens -b LE -o "$WORK/eval.bin" "$DATA/eval.h5" >/dev/null || { echo "Bail out! h5dump of eval.h5 failed"; exit 1; }

llama_ppl() { node "$NPM/ppl.mjs" "$1" "$WORK/eval.bin" 256 "$SEQS" 2>"$WORK/node.err" | awk '/^perplexity/ {print $2}'; }
mxq_ppl() { "$MXQ" eval -q --model "$1" --tokens "$DATA/eval.h5" --limit "$SEQS" | awk '/^perplexity/ {print $2}'; }
# checkpoint of a weight-only variant of the block-32 AWQ+GPTQ recipe
quantize() { # FORMAT BLOCK OUT
  sed "s/^weights: .*/weights:     {format: $1, block: $2, rounding: even}/; s/^activations: .*/activations: none/" \
    "$ROOT/configs/recipes/block32/w4a8-mxint-awq-gptq.yaml" >"$WORK/$1-$2.yaml"
  "$MXQ" quantize -q --model "$DATA" --calib "$DATA/calib.h5" --recipe "$WORK/$1-$2.yaml" --out "$3" >/dev/null 2>"$WORK/q.err"
}
check() { # N NAME LLAMA MXQ TOLERANCE
  local verdict
  verdict=$(awk -v a="$3" -v b="$4" -v t="$5" 'BEGIN { if (a == "" || b == "") { print "none"; exit }
    g = (a - b) / b; if (g < 0) g = -g; printf "%s %.2e", (g <= t ? "ok" : "far"), g }')
  case $verdict in
    ok*) echo "ok $1 - $2: llama.cpp $3, mxq $4, relative gap ${verdict#ok } (tolerance $5)" ;;
    far*) echo "not ok $1 - $2: llama.cpp $3, mxq $4, relative gap ${verdict#far } above $5" ;;
    *) echo "not ok $1 - $2: no perplexity (llama.cpp '$3', mxq '$4')"; sed 's/^/# /' "$WORK/node.err" "$WORK/q.err" 2>/dev/null | tail -5 ;;
  esac
}

n=0
for c in "${CASES[@]}"; do
  n=$((n + 1))
  case $c in
    f32)
      "$MXQ" export -q --to gguf "$DATA" "$WORK/f32.gguf" 2>"$WORK/q.err"
      check $n "FP model as F32" "$(llama_ppl "$WORK/f32.gguf")" "$(mxq_ppl "$DATA")" 1e-4 ;;
    vocab-from)
      "$MXQ" export -q --to gguf "$WORK/mxint4-32" "$WORK/vocab.gguf" --vocab-from "$WORK/f32.gguf" 2>"$WORK/q.err"
      a=$(llama_ppl "$WORK/vocab.gguf") b=$(llama_ppl "$WORK/mxint4-32.gguf")
      if [ -n "$a" ] && [ "$a" = "$b" ]; then echo "ok $n - --vocab-from the F32 export: $a, as with tokenizer.bin";
      else echo "not ok $n - --vocab-from: '$a', with tokenizer.bin '$b'"; fi ;;
    llama3-rope)
      mkdir "$WORK/rope3" && cp "$DATA"/{model.safetensors,tokenizer.bin} "$WORK/rope3/"
      sed 's/"rope_theta": 10000.0,/&\n  "rope_scaling": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 128},/' \
        "$DATA/config.json" >"$WORK/rope3/config.json"
      "$MXQ" export -q --to gguf "$WORK/rope3" "$WORK/rope3.gguf" 2>"$WORK/q.err"
      a=$(mxq_ppl "$WORK/rope3") b=$(mxq_ppl "$DATA")
      if [ -z "$a" ] || [ "$a" = "$b" ]; then echo "not ok $n - Llama-3 rope: the scaling changed nothing in mxq ('$a' vs '$b')"; continue; fi
      check $n "FP model with Llama-3 rope scaling as F32" "$(llama_ppl "$WORK/rope3.gguf")" "$a" 1e-4 ;;
    *)
      f=${c%:*} b=${c#*:}
      quantize "$f" "$b" "$WORK/$f-$b" && "$MXQ" export -q --to gguf "$WORK/$f-$b" "$WORK/$f-$b.gguf" 2>"$WORK/q.err"
      check $n "AWQ+GPTQ $f block $b, weights only" "$(llama_ppl "$WORK/$f-$b.gguf")" "$(mxq_ppl "$WORK/$f-$b")" 1e-2 ;;
  esac
done
