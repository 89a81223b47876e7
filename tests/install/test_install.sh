#!/usr/bin/env bash
# The installed mxq is usable on its own: install into a scratch root, then
# compile and run tests/install/consumer.c with nothing but what
# `pkg-config mxq` gives. Prints TAP.
#   $1 build directory, $2 source directory
set -uo pipefail
BUILD=$1
SRC=$2
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
echo "1..3"
if meson install -C "$BUILD" --destdir "$ROOT" --no-rebuild --quiet >"$ROOT/install.log" 2>&1; then
  echo "ok 1 - meson install into a scratch root"
else
  echo "not ok 1 - meson install into a scratch root"; sed 's/^/# /' "$ROOT/install.log"; exit 1
fi
pc=$(find "$ROOT" -name mxq.pc | head -1)
# the installed mxq.pc, with its prefix moved into the scratch root
prefix=$(sed -n 's/^prefix=//p' "$pc")
mkdir -p "$ROOT/pkgconfig"
sed "s|^prefix=.*|prefix=$ROOT$prefix|" "$pc" >"$ROOT/pkgconfig/mxq.pc"
export PKG_CONFIG_PATH=$ROOT/pkgconfig
flags=$(pkg-config --cflags --libs mxq)
libdir=$(pkg-config --variable=libdir mxq)
if cc -std=c11 -Wall -Werror "$SRC/tests/install/consumer.c" $flags -o "$ROOT/consumer" 2>"$ROOT/cc.log" &&
   out=$(LD_LIBRARY_PATH="$libdir" "$ROOT/consumer"); then
  echo "# cc consumer.c $flags"
  echo "# $out"
  echo "ok 2 - a program including mxq/mxq.h builds and runs with the installed flags alone"
else
  echo "not ok 2 - a program including mxq/mxq.h builds and runs with the installed flags alone"
  echo "# cc consumer.c $flags"; sed 's/^/# /' "$ROOT/cc.log"; exit 1
fi
# No public header needs HDF5; only the job API (jobs.h) needs MPI.
inc=$(pkg-config --variable=includedir mxq)
bad=""
for h in core mx model recipe gptq quantize safetensors synth; do
  echo "#include <mxq/$h.h>" | cc -std=c11 -fsyntax-only -x c - -I"$inc" 2>>"$ROOT/hdr.log" || bad="$bad $h.h"
done
echo "#include <mxq/mxq.h>" | cc -std=c11 -fsyntax-only -x c - -I"$inc" $(pkg-config --cflags ompi-c) \
  2>>"$ROOT/hdr.log" || bad="$bad mxq.h"
if [ -z "$bad" ]; then
  echo "ok 3 - public headers need neither HDF5 nor (but for jobs.h) MPI"
else
  echo "not ok 3 - public headers need neither HDF5 nor (but for jobs.h) MPI:$bad"; sed 's/^/# /' "$ROOT/hdr.log"; exit 1
fi
