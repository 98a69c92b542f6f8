#!/usr/bin/env bash
# Developer build: compiles the native modules into python/calibra/ so that `PYTHONPATH=python pytest`
# tests the working tree without reinstalling. Usage: tools/dev_build.sh [extra cmake -D args]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${CALIBRA_BUILD_DIR:-build/dev}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCALIBRA_WERROR=ON \
  -DCALIBRA_INPLACE_DIR="$PWD/python/calibra" -DPython_EXECUTABLE="$(command -v python3)" "$@" >/dev/null
cmake --build "$build" -j"$(nproc)"
