#!/usr/bin/env bash
# The main job on bundled data, set-up included. Until `mxq quantize` exists
# this casts a bundled tensor (data/mx/mx_vectors.h5, 16 rows of 172 values
# spanning 1e-4..1e4) to every MX format at block 32 and prints how much
# signal each keeps (SQNR). Output files go to out/demo/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${MXQ_BUILD_DIR:-$ROOT/build}
export MXQ_BUILD_DIR=$BUILD
bash "$ROOT/scripts/setup.sh"

OUT=$ROOT/out/demo
mkdir -p "$OUT"
INPUT="$ROOT/data/mx/mx_vectors.h5:/int8/even/bs32/input"
for fmt in mxint8 mxint4 mxint3 mxint2 mxfp8_e4m3 mxfp8_e5m2 mxfp6_e3m2 mxfp6_e2m3 mxfp4_e2m1; do
  "$BUILD/mxq" cast --format "$fmt" --block 32 --rounding even "$INPUT" "$OUT/$fmt.h5"
done
echo "demo: wrote $(ls "$OUT" | wc -l) files to $OUT (h5dump -H $OUT/mxint4.h5 shows the layout)"
