#!/usr/bin/env bash
# Compile the CUDA backend (calibra._cuda) for sm_80 and sm_90a with warnings -- and ptxas register
# spills -- as errors. Runs without a GPU; CI calls it. Usage: tools/cuda_compile_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  echo "cuda-compile-check: nvcc not found, skipped"; exit 0
fi
build=${CALIBRA_CUDA_BUILD_DIR:-build/cuda-check}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCALIBRA_CUDA=ON -DCALIBRA_WERROR=ON -DCALIBRA_BENCHMARKS=ON \
  -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
# the extension module and the CUDA C++ benchmark binaries (benchmarks/cpp/bench_*.cu)
cmake --build "$build" -j"$(nproc)" --target _cuda bench_gemm_cuda 2>&1 | tee "$build/compile.log"
if grep -E "bytes spill (stores|loads)" "$build/compile.log" | grep -vE " 0 bytes spill stores, 0 bytes spill loads" ; then
  echo "cuda-compile-check: register spills found (see above)"; exit 1
fi
echo "cuda-compile-check: calibra._cuda and bench_gemm_cuda built for sm_80 and sm_90a"
