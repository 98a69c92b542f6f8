#!/usr/bin/env bash
# The first-GPU-run check of calibra, in one script (issue 22). Run from anywhere on the GPU machine:
#
#   tools/gpu_check.sh OUT_DIR [--dry-run] [--budget SECONDS]
#
# Builds calibra._cpu and calibra._cuda in place (CMake, like tools/dev_build.sh, for the local GPU's
# architecture only; no pip, no downloads), prints `calibra info`, runs `calibra selftest --device cuda`,
# tests/ops and tests/nn on CUDA (the harness asserts the native kernel served every call), every op once
# under compute-sanitizer memcheck and racecheck (tools/gpu_check_kernels.py ops), the benchmarks
# (bench_gemm, bench_hessian/quantize/hadamard --device cuda) and a GPTQ solve of one Llama-3-8B-shaped
# layer (tools/gpu_check_kernels.py gptq). Every step has its own log (OUT_DIR/NAME.log) and time cap; a
# failing step is recorded and the script goes on. The total budget (default 480 s) caps every step's
# own cap; a step is skipped ("no time left") when less than min(its cap, 20 s) of the budget remains.
# At the end: OUT_DIR/summary.json and a printed table; exit status 1 if a step failed.
#
# --dry-run (CI, any machine): nothing runs on a GPU; each step's command is written down and checked
# instead (paths exist, scripts accept the flags given -- their own --help --, pytest selects tests, the
# CMake options exist, the drivers run on the CPU), so a path or flag mistake cannot waste GPU minutes.
#
# Environment: PYTHON (default python3), CALIBRA_GPU_CHECK_ARCH (CMake CUDA architectures, overrides
# the detection), CALIBRA_GPU_CHECK_BUILD_DIR (default build/gpu-check).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; }
OUT="" DRY=0 BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET="${2:?--budget needs SECONDS}"; shift ;;
    --budget=*) BUDGET="${1#--budget=}" ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check: one OUT_DIR only" >&2; exit 2; }; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { usage >&2; exit 2; }
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
rm -rf "$OUT/plan" "$OUT/steps.tsv" "$OUT/summary.json"
[ $DRY -eq 1 ] && mkdir -p "$OUT/plan"
: >"$OUT/steps.tsv"

PY="${PYTHON:-python3}"
# The real run builds calibra's modules in place and imports the tree. A dry run imports the tree only
# when it has an in-place build; otherwise (CI) the installed calibra is what the CPU rehearsals use.
if [ $DRY -eq 0 ] || compgen -G "$ROOT/python/calibra/_cpu*.so" >/dev/null; then
  export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
fi
# The caller's skip accounting (.ci/run) is about its own session, not the selections checked here.
unset CALIBRA_REQUIRED_TESTS CALIBRA_SKIP_REPORT
export PYTHONUNBUFFERED=1
BUILD="${CALIBRA_GPU_CHECK_BUILD_DIR:-build/gpu-check}"
NPROC="$(nproc 2>/dev/null || echo 4)"
MIN_STEP_S=20  # a step is skipped when less than min(its cap, this) of the budget is left
T0=$SECONDS

# step NAME CAP CMD...: run CMD with a time cap into OUT/NAME.log and record it (never aborts the script).
step() {
  local name="$1" cap="$2"; shift 2
  local log="$OUT/$name.log" left=$((BUDGET - (SECONDS - T0)))
  if [ $DRY -eq 1 ]; then  # written down here, checked by gpu_check_lib.py finish
    printf '%s\0' "$@" >"$OUT/plan/$name.argv"
    printf '%s\tplanned\t\t0\t%s\t%s\n' "$name" "$log" "$cap" >>"$OUT/steps.tsv"
    echo "[dry-run] $name: $*"
    return 0
  fi
  local floor=$((cap < MIN_STEP_S ? cap : MIN_STEP_S))
  if [ "$left" -lt "$floor" ]; then
    echo "no time left: ${left}s of the ${BUDGET}s budget remain (this step needs at least ${floor}s)" >"$log"
    printf '%s\tskipped (no time left)\t\t0\t%s\t%s\n' "$name" "$log" "$cap" >>"$OUT/steps.tsv"
    echo "== $name: skipped (no time left: ${left}s)"
    return 0
  fi
  [ "$left" -lt "$cap" ] && cap=$left  # the budget caps the step's own cap
  echo "== $name (cap ${cap}s): $*"
  local t=$SECONDS rc status
  { echo "\$ $*"; echo; } >"$log"
  timeout --kill-after=10 "$cap" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t))" "$log" "$cap" >>"$OUT/steps.tsv"
  echo "   -> $status (rc $rc, $((SECONDS - t))s, $log)"
}

find_tool() {  # find_tool NAME: PATH, $CUDA_HOME, /usr/local/cuda, next to nvcc; else NAME itself
  local t="$1" d n
  if command -v "$t" >/dev/null; then command -v "$t"; return; fi
  n="$(command -v nvcc 2>/dev/null || true)"
  for d in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin "/usr/local/cuda/$t" "${n:+$(dirname "$n")}" \
           "${n:+$(dirname "$(readlink -f "$n")")}" "${n:+$(dirname "$(readlink -f "$n")")/../$t}"; do
    if [ -n "$d" ] && [ -x "$d/$t" ]; then echo "$d/$t"; return; fi
  done
  echo "$t"
}

# ---- machine info (also for the summary) ------------------------------------------------------------
machine_info() {
  local f="$OUT/machine.txt" smi
  {
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host=$(hostname 2>/dev/null || echo unknown)"
    echo "git_commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "${CALIBRA_GIT_COMMIT:-unknown (no .git here)}")"
    echo "dry_run=$DRY"
    echo "budget_s=$BUDGET"
    echo "nproc=$NPROC"
    smi="$(command -v nvidia-smi || true)"
    if [ -n "$smi" ]; then
      echo "gpu=$(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
    else
      echo "gpu=none (no nvidia-smi)"
    fi
    echo "nvcc=$( (nvcc --version 2>/dev/null || "$(find_tool nvcc)" --version 2>/dev/null) | tail -2 | head -1 || echo none)"
    "$PY" - <<'EOF' 2>&1 || echo "python=$PY failed to import torch"
import platform, torch
print(f"python={platform.python_version()}")
print(f"torch={torch.__version__}")
print(f"torch_cuda={torch.version.cuda}")
print(f"torch_sees_cuda={torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"torch_device={torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})")
EOF
  } >"$f"
  cat "$f"
}

# CMake CUDA architectures for the local GPU: 9.0 -> 90a-real (wgmma), 8.x -> 80-real; else the project
# default, whose compute_80 PTX is what a newer GPU (Blackwell) runs, JIT-compiled by the driver.
cuda_arch() {
  if [ -n "${CALIBRA_GPU_CHECK_ARCH:-}" ]; then echo "$CALIBRA_GPU_CHECK_ARCH"; return; fi
  local cc=""
  if command -v nvidia-smi >/dev/null; then
    cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')"
  fi
  [ -n "$cc" ] || cc="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null || true)"
  case "$cc" in
    9.0) echo "90a-real" ;;
    8.*) echo "80-real" ;;
    "") [ $DRY -eq 1 ] && echo "90a-real" || echo "80-real;90a-real;80-virtual" ;;
    *) echo "80-real;90a-real;80-virtual" ;;
  esac
}

# ---- the steps ----------------------------------------------------------------------------------------
step_build() {
  local arch gen=() nvcc
  arch="$(cuda_arch)"
  nvcc="$(find_tool nvcc)"
  command -v ninja >/dev/null && gen=(-G Ninja)
  echo "CUDA architectures: $arch; nvcc: $nvcc"
  step configure 90 cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCALIBRA_CUDA=ON \
    "-DCMAKE_CUDA_ARCHITECTURES=$arch" "-DCMAKE_CUDA_COMPILER=$nvcc" "-DCALIBRA_INPLACE_DIR=$ROOT/python/calibra" \
    "-DPython_EXECUTABLE=$(command -v "$PY")"
  step build 240 cmake --build "$BUILD" -j "$NPROC" --target _cpu _cuda
}

step_info() { step info 30 "$PY" -m calibra info; }
step_selftest() { step selftest 60 "$PY" -m calibra selftest --device cuda; }
# The CUDA parametrizations are named [cuda] / [...-cuda-...] (tests/ops/harness.py DEVICES), plus
# tests/nn's test_cuda_*; the harness fails (not skips) a CUDA test whose native backend did not load.
step_tests() { step tests 150 "$PY" -m pytest -q tests/ops tests/nn -k cuda -p no:cacheprovider; }

step_sanitizers() {
  local san
  san="$(find_tool compute-sanitizer)"
  # No caching allocator: memcheck then sees each tensor's own bounds, not torch's pooled blocks.
  step memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --error-exitcode 1 --print-limit 20 \
    "$PY" tools/gpu_check_kernels.py ops --device cuda
  step racecheck 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool racecheck --error-exitcode 1 --print-limit 20 \
    "$PY" tools/gpu_check_kernels.py ops --device cuda
}

step_benchmarks() {
  step bench_gemm 90 "$PY" benchmarks/bench_gemm.py --models llama3-8b --batches 1,16,128
  step bench_hessian 60 "$PY" benchmarks/bench_hessian.py --device cuda --repeat 5
  step bench_quantize 45 "$PY" benchmarks/bench_quantize.py --device cuda --repeat 5
  step bench_hadamard 45 "$PY" benchmarks/bench_hadamard.py --device cuda --repeat 5
  step gptq_8b_layer 90 "$PY" tools/gpu_check_kernels.py gptq --device cuda --shape 4096x14336 --reference
  # the sweep's share of the solve, native (warp per row) vs the reference column loop, on the same layer
  step bench_gptq 75 "$PY" benchmarks/bench_gptq.py --device cuda --repeat 3
}

echo "gpu_check: $ROOT -> $OUT ($([ $DRY -eq 1 ] && echo "dry run" || echo "budget ${BUDGET}s"))"
machine_info
step_build
step_info
step_selftest
step_tests
step_sanitizers
step_benchmarks
"$PY" "$ROOT/tools/gpu_check_lib.py" finish "$OUT" $([ $DRY -eq 1 ] && echo --dry-run)
rc=$?
echo "gpu_check: done in $((SECONDS - T0))s (rc $rc)"
exit $rc
