#!/usr/bin/env bash
# Install what mxq needs (Debian packages, through apt-get) and build it.
# Safe to run again: installs only what is missing, rebuilds only what changed.
#   MXQ_BUILD_DIR        build directory (default: <repo>/build)
#   MXQ_EXTRA_PACKAGES   more Debian packages to install (the test and fuzz scripts use this)
#   MXQ_SETUP_NO_BUILD   set to 1 to install only
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${MXQ_BUILD_DIR:-$ROOT/build}

PACKAGES=(
  gcc libc6-dev pkgconf meson ninja-build python3
  openmpi-bin libopenmpi-dev
  libhdf5-openmpi-dev hdf5-tools
  libscalapack-openmpi-dev libopenblas-dev liblapacke-dev
  libjansson-dev libfyaml-dev libcmocka-dev
)
# shellcheck disable=SC2206
PACKAGES+=(${MXQ_EXTRA_PACKAGES:-})

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "setup: error: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -q >/dev/null
  "${SUDO[@]}" apt-get install -y -q "${missing[@]}" >/dev/null
  echo "setup: packages installed"
fi

if [ "${MXQ_SETUP_NO_BUILD:-0}" = 1 ]; then
  exit 0
fi
if [ ! -f "$BUILD/build.ninja" ]; then
  meson setup "$BUILD" "$ROOT" >/dev/null
fi
meson compile -C "$BUILD" >/dev/null
echo "setup: built $BUILD/mxq"
