#!/usr/bin/env bash
# The floor lanes: install calibra from this working tree into a brand-new virtual environment with
# the OLDEST transformers / torch that pyproject.toml declares, and run a short test lane there.
# The floors are read from [project].dependencies (the `transformers>=X` and `torch>=Y` entries);
# pyproject.toml is the one source of truth. Results are recorded in docs/compatibility.md.
#
#   tools/floor_lane.sh transformers [--keep] [--full] [--version V]
#       transformers==<floor> (pinned through a pip constraint) + torch 2.13.0 (CPU build), then the
#       README quickstart's quantize, then the tests that touch transformers: tests/compat tests/kv
#       tests/calib tests/export (not tests/export/clients) tests/quant_api tests/eval tests/io.
#       --full runs the whole suite (`pytest -q tests`) instead.
#   tools/floor_lane.sh torch [--keep] [--version V]
#       torch==<floor> (from PyPI: a CUDA build with its nvidia-* wheels, several GB) + the newest
#       transformers pip resolves for it + the test extra without compressed-tensors (whose pinned
#       release needs torch>=2.10), then: import calibra, calibra info, tests/ops, one quantize.
#
#   --version V  test V instead of the declared floor (for bisecting a new floor); for the transformers
#                lane `--version newest` pins nothing: the newest release the declared range admits
#   --keep       keep the virtual environment afterwards (default: removed after the run)
#
# Environments live in ${CALIBRA_FLOOR_VENVS:-$HOME/.cache/calibra-floor}/<lane> (outside the tree or
# in a git-ignored folder of it), are recreated on every run, and every install uses --no-cache-dir.
# calibra's C++ is compiled by pip's isolated build into a build folder inside that environment
# (about a minute on an idle 2-core machine), so the tree's build/ is never touched. Exits non-zero if any step fails; prints each step's time.
set -u -o pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export HF_HUB_DISABLE_PROGRESS_BARS=1   # transformers' "Loading weights" bars would flood the log

usage() { echo "usage: $0 transformers|torch [--keep] [--full] [--version V]" >&2; exit 2; }
LANE="${1:-}"; [ "$LANE" = transformers ] || [ "$LANE" = torch ] || usage; shift
KEEP=0; FULL=0; VERSION=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --full) FULL=1 ;;
    --version) [ $# -ge 2 ] || usage; VERSION="$2"; shift ;;
    *) usage ;;
  esac
  shift
done

# floor NAME: the X of the `NAME>=X` entry in [project].dependencies
floor() {
  "$PY" - "$1" <<'EOF'
import re, sys, tomllib
name = sys.argv[1]
with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for d in deps:
    m = re.fullmatch(rf"\s*{re.escape(name)}\s*(.*)", d)
    if m:
        for spec in m.group(1).split(","):
            spec = spec.strip()
            if spec.startswith(">="):
                print(spec[2:].strip()); sys.exit(0)
sys.exit(f"pyproject.toml: no `{name}>=X` entry in [project].dependencies")
EOF
}
TF_FLOOR="$(floor transformers)" || exit 2
TORCH_FLOOR="$(floor torch)" || exit 2
CPU_TORCH="2.13.0"   # the CPU-only torch build this project installs (README quickstart)

BASE="${CALIBRA_FLOOR_VENVS:-$HOME/.cache/calibra-floor}"
BASE="$(realpath -m "$BASE")"
case "$BASE/" in "$ROOT"/*)  # inside the tree only where git ignores it (e.g. build/)
  git check-ignore -q "$BASE" || { echo "[floor] CALIBRA_FLOOR_VENVS must be outside the source tree or git-ignored" >&2; exit 2; } ;;
esac
VENV="$BASE/$LANE"
LOG="$BASE/$LANE.log"
mkdir -p "$BASE"
: >"$LOG"

T0=$(date +%s); FAILED=()
step() {  # step NAME CMD...: run, time, log; a failure is recorded and the lane goes on
  local name="$1"; shift
  local t=$(date +%s)
  echo "[floor] >>> $name"
  "$@" 2>&1 | tee -a "$LOG" | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "[floor] <<< $name: rc=$rc, $(( $(date +%s) - t )) s"
  [ "$rc" -eq 0 ] || FAILED+=("$name")
  return "$rc"
}
finish() {
  local total=$(( $(date +%s) - T0 ))
  [ "$KEEP" -eq 1 ] || rm -rf "$VENV"
  echo "[floor] lane $LANE, $total s total ($(nproc) cores, load average now $(cut -d' ' -f1-3 /proc/loadavg)); log: $LOG"
  if [ ${#FAILED[@]} -gt 0 ]; then echo "[floor] FAILED: ${FAILED[*]}"; exit 1; fi
  echo "[floor] PASSED"; exit 0
}

echo "[floor] $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
  "$(git diff --quiet HEAD -- 2>/dev/null || echo '(working tree has uncommitted changes)')"
echo "[floor] $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) (step times scale with it)"
echo "[floor] declared floors (pyproject.toml): transformers>=$TF_FLOOR, torch>=$TORCH_FLOOR"

rm -rf "$VENV"
step "create venv $VENV" "$PY" -m venv "$VENV" || finish
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --no-cache-dir --disable-pip-version-check)
CONSTRAINTS="$VENV/constraints.txt"

if [ "$LANE" = transformers ]; then
  TF="${VERSION:-$TF_FLOOR}"
  # a bare floor like 5.0 means the first release of that line; `newest` pins nothing (pip resolves
  # the newest release the declared range admits)
  [[ "$TF" =~ ^[0-9]+\.[0-9]+$ ]] && TF="$TF.0"
  printf 'torch==%s\n' "$CPU_TORCH" >"$CONSTRAINTS"
  [ "$TF" = newest ] || printf 'transformers==%s\n' "$TF" >>"$CONSTRAINTS"
  step "install torch==$CPU_TORCH" "${PIP[@]}" "torch==$CPU_TORCH" || finish
else
  TV="${VERSION:-$TORCH_FLOOR}"
  [[ "$TV" =~ ^[0-9]+\.[0-9]+$ ]] && TV="$TV.0"
  printf 'torch==%s\n' "$TV" >"$CONSTRAINTS"
  step "install torch==$TV" "${PIP[@]}" "torch==$TV" || finish
fi
# pip's isolated build compiles the native modules; the build folder lives in the venv, not in build/
if [ "$LANE" = transformers ]; then
  step "install calibra[test] from $ROOT" "${PIP[@]}" -c "$CONSTRAINTS" \
    -C "build-dir=$VENV/calibra-build" ".[test]" || finish
else
  # The test extra cannot be installed on an old torch: compressed-tensors 0.20.0 (pinned there) needs
  # torch>=2.10. The torch lane needs none of the clients, so it takes the extra without that pin.
  mapfile -t TEST_EXTRA < <("$PY" -c '
import tomllib
for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]:
    if not r.replace(" ", "").startswith("compressed-tensors"): print(r)')
  step "install calibra + ${TEST_EXTRA[*]} from $ROOT" "${PIP[@]}" -c "$CONSTRAINTS" \
    -C "build-dir=$VENV/calibra-build" . "${TEST_EXTRA[@]}" || finish
fi

step "resolved versions" "$VPY" -c '
import importlib.metadata as md, sys, calibra
print("python", sys.version.split()[0])
for p in ("calibra", "torch", "transformers", "tokenizers", "safetensors", "huggingface-hub",
          "compressed-tensors", "gguf", "pytest"):
    try: print(f"{p} {md.version(p)}")
    except md.PackageNotFoundError: print(f"{p} (not installed)")
print("calibra from", calibra.__file__)
assert "site-packages" in calibra.__file__, "calibra must come from the venv, not the tree"
' || finish

quantize() {  # README quickstart command 1 (without the install), into a scratch folder
  local out="$BASE/$LANE-quantize-out"; rm -rf "$out"
  step "calibra quantize (gptq w4 g128 --samples 32, builtin:tiny-llama, export compressed-tensors)" \
    "$VENV/bin/calibra" quantize --input builtin:tiny-llama --output "$out" --method gptq --bits 4 \
    --group-size 128 --samples 32 --export compressed-tensors --no-progress
  rm -rf "$out"
}

# pytest runs from the tree (tests/ and conftest.py) against the INSTALLED calibra; python/ is not on
# the path (rootdir insertion covers tests/ only) and the check above proves which calibra loaded.
PYTEST=("$VPY" -m pytest -q -p no:cacheprovider --durations=10)
if [ "$LANE" = transformers ]; then
  quantize
  if [ "$FULL" -eq 1 ]; then
    step "pytest -q tests" "${PYTEST[@]}" tests
  else
    SUBSET=(tests/kv tests/calib tests/export tests/quant_api tests/eval tests/io)
    [ -d tests/compat ] && SUBSET=(tests/compat "${SUBSET[@]}")
    step "pytest (transformers touchpoints)" "${PYTEST[@]}" "${SUBSET[@]}" --ignore=tests/export/clients
  fi
else
  step "import calibra" "$VPY" -c 'import calibra, torch; print("calibra", calibra.__version__, "torch", torch.__version__)'
  step "calibra info" "$VENV/bin/calibra" info
  step "pytest tests/ops" "${PYTEST[@]}" tests/ops
  quantize
fi
finish
