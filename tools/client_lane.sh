#!/usr/bin/env bash
# The real-client lane: loads calibra's exports in the engines users run them in and compares logits (or
# greedy tokens) with calibra's simulated quantized model and with the dense model.
#
#   tools/client_lane.sh [all] [CLIENT...]     set up whatever is missing, then run the clients
#   tools/client_lane.sh setup [CLIENT...]     only create the virtual environments / build llama.cpp
#   tools/client_lane.sh run [CLIENT...]       only run the client tests
#
# CLIENT is any of gptq mlx llmc gguf (default: all four). The exit status is 0 only when every selected
# client ran and passed: a failed test, a module that cannot be imported or collected, no test collected,
# or a test that skipped (its engine missing) is a FAILURE of that client. Leave a client out of the
# arguments to deselect it; that is the only way not to run one.
#
# Each client lives in its own venv under build/client-venvs/ (their pins conflict; pins from the format
# study): gptq = gptqmodel 7.6.0 + optimum 2.3.0 + accelerate; mlx = mlx[cpu] 0.32.4 + mlx-lm 0.32.2;
# llmc = llmcompressor 0.14.0.1 (transformers 5.17 + compressed-tensors 0.19); gguf = gguf 0.19.0 +
# llama-cpp-python 0.3.36 (llama.cpp's logits), plus llama.cpp tools built from the llama.cpp tree vendored
# in the llama-cpp-python 0.3.36 sdist (build/llama.cpp/). Every venv is made from the *base* interpreter
# (also when this script runs inside a venv, whose packages a client venv would otherwise not see) and gets
# torch==2.13.0 (the CPU build) first, pinned by a constraints file so that no client pulls the CUDA torch,
# then calibra itself as a wheel built from this checkout. Needs PyPI for setup only.
# Logs and a summary go to build/client-lane/.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
# the real base interpreter: inside a venv, sys._base_executable is the python the venv was made from
BASE_PY="$("$PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')"
VENVS="$ROOT/build/client-venvs"
LOGS="$ROOT/build/client-lane"
LLAMA="$ROOT/build/llama.cpp"
WHEEL="$LOGS/wheel"
TORCH="torch==2.13.0"
ALL="gptq mlx llmc gguf"
mkdir -p "$VENVS" "$LOGS"
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"
echo "$TORCH" >"$LOGS/constraints.txt"
# llama.cpp inside llama-cpp-python: no -march=native (see build_llama)
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"

pins() {  # the client's packages
  case "$1" in
    gptq) echo "gptqmodel==7.6.0 optimum==2.3.0 accelerate" ;;
    mlx) echo "mlx[cpu]==0.32.4 mlx-lm==0.32.2" ;;
    llmc) echo "llmcompressor==0.14.0.1" ;;
    gguf) echo "gguf==0.19.0 llama-cpp-python==0.3.36" ;;
  esac
}

testfile() {
  case "$1" in
    gptq) echo tests/export/clients/test_gptq_client.py ;;
    mlx) echo tests/export/clients/test_mlx_client.py ;;
    llmc) echo tests/export/clients/test_ct_asym_client.py ;;
    gguf) echo tests/export/clients/test_gguf_client.py ;;
  esac
}

build_wheel() {  # calibra from this checkout, as a user installs it
  echo "[lane] building the calibra wheel"
  rm -rf "$WHEEL"
  "$BASE_PY" -m pip wheel -q --no-deps --no-cache-dir . -w "$WHEEL" >"$LOGS/wheel.log" 2>&1 || {
    echo "[lane] calibra wheel build failed, see $LOGS/wheel.log"; return 1; }
}

venv() {  # venv NAME: create build/client-venvs/NAME once
  local name="$1" v="$VENVS/$1"
  if [ -f "$v/.ready" ]; then echo "[lane] venv $name ready"; return 0; fi
  echo "[lane] creating venv $name from $BASE_PY: $TORCH, $(pins "$name")"
  rm -rf "$v"
  "$BASE_PY" -m venv "$v" || return 1
  local pip=("$v/bin/python" -m pip install -q --disable-pip-version-check -c "$LOGS/constraints.txt")
  # shellcheck disable=SC2046
  { "${pip[@]}" "$TORCH" && "${pip[@]}" $(pins "$name") pytest "tokenizers>=0.15"; } >"$LOGS/pip-$name.log" 2>&1 || {
    echo "[lane] pip install for $name failed, see $LOGS/pip-$name.log"; return 1; }
  touch "$v/.ready"
}

install_calibra() {  # the current checkout's wheel into venv NAME (its deps resolved around the client pins)
  local v="$VENVS/$1"
  "$v/bin/python" -m pip install -q --disable-pip-version-check -c "$LOGS/constraints.txt" --force-reinstall \
    --no-deps "$WHEEL"/calibra-*.whl >"$LOGS/calibra-$1.log" 2>&1 &&
    "$v/bin/python" -m pip install -q --disable-pip-version-check -c "$LOGS/constraints.txt" "$WHEEL"/calibra-*.whl \
    >>"$LOGS/calibra-$1.log" 2>&1 || { echo "[lane] installing calibra into $1 failed, see $LOGS/calibra-$1.log"; return 1; }
}

# GGML_NATIVE is off on purpose: on CPUs with AMX (Sapphire Rapids and later) -march=native enables
# ggml's AMX matmul, which segfaults on tiny models (ggml_backend_amx_mul_mat, seen with ggml 0.25.3);
# AVX2 builds run everywhere the lane runs.
build_llama() {
  if [ -x "$LLAMA/build/bin/llama-simple" ]; then echo "[lane] llama.cpp tools ready"; return 0; fi
  echo "[lane] building llama.cpp tools from the llama-cpp-python 0.3.36 sdist"
  mkdir -p "$LLAMA" && cd "$LLAMA" || return 1
  if [ ! -d src ]; then
    "$BASE_PY" -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d dl >"$LOGS/llama-download.log" 2>&1 || {
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

declare -A RESULT

setup_one() {
  venv "$1" || { RESULT[$1]="FAIL (venv setup)"; return 1; }
  if [ "$1" = gguf ]; then build_llama || { RESULT[$1]="FAIL (llama.cpp build)"; return 1; }; fi
}

run_one() {  # run_one CLIENT: pytest's own exit status, collection errors and skips all count
  local c="$1" py="$VENVS/$1/bin/python" log="$LOGS/test-$1.log" skips="$LOGS/skips-$1.json"
  if [ ! -x "$py" ]; then RESULT[$c]="FAIL (no venv: run tools/client_lane.sh setup $c)"; return 1; fi
  install_calibra "$c" || { RESULT[$c]="FAIL (calibra install)"; return 1; }
  echo "[lane] $c: $(testfile "$c")"
  rm -f "$skips"
  # the installed calibra (not python/): PYTHONPATH holds the checkout root for the tests package only
  CALIBRA_LLAMA_CPP_BIN="$LLAMA/build/bin" CALIBRA_SKIP_REPORT="$skips" PYTHONPATH="$ROOT" \
    "$py" -m pytest -q -s -rs -p no:cacheprovider "$(testfile "$c")" >"$log" 2>&1
  local rc=$?
  tail -n 25 "$log"
  local nskip
  nskip=$("$py" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["skipped"]))' "$skips" 2>/dev/null || echo "?")
  if [ $rc -eq 0 ] && [ "$nskip" = 0 ]; then RESULT[$c]="PASS"
  elif [ $rc -eq 0 ]; then RESULT[$c]="FAIL ($nskip skipped: the client could not run, see $log)"
  elif [ $rc -eq 2 ] || [ $rc -eq 4 ]; then RESULT[$c]="FAIL (pytest rc=$rc: import/collection error, see $log)"
  elif [ $rc -eq 5 ]; then RESULT[$c]="FAIL (no tests collected)"
  else RESULT[$c]="FAIL (pytest rc=$rc, see $log)"; fi
}

mode=all
case "${1:-}" in setup|run|all) mode="$1"; shift ;; esac
clients="${*:-$ALL}"
for c in $clients; do
  [[ " $ALL " == *" $c "* ]] || { echo "usage: $0 [setup|run|all] [$ALL]..."; exit 2; }
done

if [ "$mode" != setup ]; then build_wheel || exit 1; fi
for c in $clients; do
  if [ "$mode" != run ]; then setup_one "$c" || continue; fi
  if [ "$mode" != setup ]; then run_one "$c"; fi
done

if [ "$mode" = setup ]; then
  status=0
  for c in $clients; do echo "[lane] setup $c: ${RESULT[$c]:-ok}"; [ -z "${RESULT[$c]:-}" ] || status=1; done
  exit $status
fi
echo
for c in $clients; do grep -h "^CLIENT " "$LOGS/test-$c.log" 2>/dev/null; done | sort >"$LOGS/summary.txt"
cat "$LOGS/summary.txt"
status=0
for c in $clients; do
  echo "[lane] $c: ${RESULT[$c]}"
  [ "${RESULT[$c]}" = PASS ] || status=1
done
for c in $ALL; do [[ " $clients " == *" $c "* ]] || echo "[lane] $c: deselected"; done
exit $status
