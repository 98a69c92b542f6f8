#!/usr/bin/env bash
# The optional real-client lane: loads calibra's exports in the engines users run them in and
# compares logits (or greedy tokens) with calibra's simulated quantized model.
#
#   tools/client_lane.sh            # set up whatever is missing, then run every client
#   tools/client_lane.sh setup      # only create the virtual environments / build llama.cpp
#   tools/client_lane.sh run        # only run the client tests (clients missing -> skipped)
#
# Each client lives in its own venv under build/client-venvs/ (their pins conflict; pins from the
# format study): gptq = gptqmodel 7.6.0 + optimum 2.3.0 + accelerate; mlx = mlx[cpu] 0.32.4 +
# mlx-lm 0.32.2; llmc = llmcompressor 0.14.0.1 (transformers 5.17 + compressed-tensors 0.19, the
# loader that still reads asymmetric compressed-tensors); gguf = gguf 0.19.0 plus llama.cpp tools built
# from the llama.cpp tree vendored in the llama-cpp-python 0.3.36 sdist (build/llama.cpp/).
# Needs network access to PyPI for setup only. Logs and a summary go to build/client-lane/.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENVS="$ROOT/build/client-venvs"
LOGS="$ROOT/build/client-lane"
LLAMA="$ROOT/build/llama.cpp"
mkdir -p "$VENVS" "$LOGS"
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"

venv() {  # venv NAME PIP-ARGS...: create build/client-venvs/NAME once (system torch/transformers visible)
  local name="$1"; shift
  if [ -f "$VENVS/$name/.ready" ]; then echo "[lane] venv $name ready"; return 0; fi
  echo "[lane] creating venv $name: $*"
  rm -rf "$VENVS/$name"
  "$PY" -m venv --system-site-packages "$VENVS/$name" || return 1
  "$VENVS/$name/bin/python" -m pip install -q "$@" >"$LOGS/pip-$name.log" 2>&1 || {
    echo "[lane] pip install for $name failed, see $LOGS/pip-$name.log"; return 1; }
  touch "$VENVS/$name/.ready"
}

# GGML_NATIVE is off on purpose: on CPUs with AMX (Sapphire Rapids and later) -march=native enables
# ggml's AMX matmul, which segfaults on tiny models (ggml_backend_amx_mul_mat, seen with ggml 0.25.3);
# AVX2 builds run everywhere the lane runs.
build_llama() {
  if [ -x "$LLAMA/build/bin/llama-simple" ]; then echo "[lane] llama.cpp tools ready"; return 0; fi
  echo "[lane] building llama.cpp tools from the llama-cpp-python 0.3.36 sdist"
  mkdir -p "$LLAMA" && cd "$LLAMA" || return 1
  if [ ! -d src ]; then
    "$PY" -m pip download -q --no-deps llama-cpp-python==0.3.36 -d dl >"$LOGS/llama-download.log" 2>&1 || {
      echo "[lane] download failed, see $LOGS/llama-download.log"; cd "$ROOT"; return 1; }
    tar xzf dl/llama_cpp_python-0.3.36.tar.gz && mv llama_cpp_python-0.3.36/vendor/llama.cpp src && rm -rf llama_cpp_python-0.3.36
  fi
  cmake -S src -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    >"$LOGS/llama-cmake.log" 2>&1 && ninja -C build llama-simple llama-quantize >"$LOGS/llama-build.log" 2>&1
  local rc=$?
  cd "$ROOT"
  [ $rc -eq 0 ] || echo "[lane] llama.cpp build failed, see $LOGS/llama-build.log"
  return $rc
}

setup() {
  venv gptq gptqmodel==7.6.0 optimum==2.3.0 accelerate
  venv mlx "mlx[cpu]==0.32.4" mlx-lm==0.32.2
  venv llmc llmcompressor==0.14.0.1
  venv gguf gguf==0.19.0
  build_llama
  return 0
}

run_one() {  # run_one VENV TESTFILE
  local py="$VENVS/$1/bin/python"
  [ -x "$py" ] || py="$PY"
  echo "[lane] $1: $2"
  CALIBRA_LLAMA_CPP_BIN="$LLAMA/build/bin" PYTHONPATH="$ROOT/python:$ROOT" "$py" -m pytest -q -s -rs -p no:cacheprovider \
    "$2" 2>&1 | tee "$LOGS/test-$1.log" | tail -n 25
}

run() {
  run_one gptq tests/export/clients/test_gptq_client.py
  run_one mlx tests/export/clients/test_mlx_client.py
  run_one llmc tests/export/clients/test_ct_asym_client.py
  run_one gguf tests/export/clients/test_gguf_client.py
  grep -h "^CLIENT " "$LOGS"/test-*.log 2>/dev/null | sort | tee "$LOGS/summary.txt"
}

case "${1:-all}" in
  setup) setup ;;
  run) run ;;
  all) setup; run ;;
  *) echo "usage: $0 [setup|run|all]"; exit 2 ;;
esac
