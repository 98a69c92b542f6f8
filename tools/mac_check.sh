#!/usr/bin/env bash
# The Mac check of calibra (issue 24), in one command, for a Mac user or a future macOS CI runner:
#
#   tools/mac_check.sh OUT_DIR [--dry-run]
#
# Steps (each logged to OUT_DIR/NAME.log; a failing step is recorded and the script goes on):
#   build      CMake build in place with the Metal library (CALIBRA_METAL=ON: xcrun metal -> kernels.metallib)
#   info       calibra info (the mps backend must be listed as loaded)
#   selftest   calibra selftest --device mps (every op with a Metal kernel, native asserted)
#   ops        tests/ops and tests/metal on this machine (the mps parametrizations run on a Mac)
#   guard      tests/mps: the MPS-guard lane (runs on any machine; on a Mac it must still pass)
#   quantize   one GPTQ quantize of each builtin model with --device mps
#   bench_w4a16_gemv         benchmarks/bench_w4a16_gemv.py --device mps: the Metal GEMV (batch 1) against the
#                            chip's nominal memory bandwidth and torch.clone's measured rate
#   bench_quantize_vs_clone  benchmarks/bench_quantize.py --device mps: the Metal quantize kernels vs torch.clone
# The benchmark tables are in their logs; their numbers (with the chip named) belong in docs/backends.md.
#
# --dry-run (CI, Linux): nothing needs a Mac; each step's command is checked instead (its scripts and paths
# exist, the CLI and the benchmarks accept the flags, pytest collects the selections, the GEMV benchmark's
# driver runs on the CPU with a small shape; CI runs tests/mps itself).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="" DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "mac_check: unknown option $a" >&2; exit 2 ;;
    *) OUT="$a" ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: tools/mac_check.sh OUT_DIR [--dry-run]" >&2; exit 2; }
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
PY="${PYTHON:-python3}"
unset CALIBRA_REQUIRED_TESTS CALIBRA_SKIP_REPORT
# The tree's package, built in place by the build step; a dry run builds nothing, so it imports the tree's
# package only when that has its native module already (a developer's tree), else the installed calibra.
if [ "$DRY" = 0 ] || compgen -G "$ROOT/python/calibra/_cpu*.so" >/dev/null; then
  export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
fi
: >"$OUT/steps.tsv"
failed=0

record() { printf '%s\t%s\n' "$1" "$2" >>"$OUT/steps.tsv"; echo "mac_check: $1 -> $2"; }

# step NAME REAL_CMD -- DRY_CMD: the real command on a Mac, its rehearsal with --dry-run
step() {
  local name="$1"; shift
  local real=() dry=()
  while [ "$1" != "--" ]; do real+=("$1"); shift; done
  shift
  dry=("$@")
  if [ $DRY -eq 1 ]; then
    printf '%q ' "${real[@]}" >"$OUT/$name.cmd"
    if "${dry[@]}" >"$OUT/$name.log" 2>&1; then record "$name" "dry-run ok"; else record "$name" "FAILED"; failed=1; fi
  else
    if "${real[@]}" >"$OUT/$name.log" 2>&1; then record "$name" "ok"; else record "$name" "FAILED"; failed=1; fi
  fi
}

exists() { for p in "$@"; do [ -e "$p" ] || { echo "missing: $p"; return 1; }; done; }
# accepts SCRIPT FLAG...: the script's own --help names every flag the real step passes it
accepts() {
  local script="$1" help f; shift
  help="$("$PY" "$script" --help)" || return 1
  for f in "$@"; do grep -q -- "$f" <<<"$help" || { echo "$script does not accept $f"; return 1; }; done
  echo "$script accepts $*"
}
BUILD="${CALIBRA_MAC_CHECK_BUILD_DIR:-build/mac-check}"

step build bash -c "cmake -S . -B $BUILD -DCALIBRA_METAL=ON -DCMAKE_BUILD_TYPE=Release && cmake --build $BUILD -j" \
  -- bash -c "exists() { for p; do [ -e \"\$p\" ] || { echo missing \$p; exit 1; }; done; }; exists CMakeLists.txt cmake/calibra_metal.cmake metal/kargs.h; grep -q 'option(CALIBRA_METAL ' CMakeLists.txt"
step info "$PY" -m calibra info -- "$PY" -m calibra info
step selftest "$PY" -m calibra selftest --device mps -- "$PY" -m calibra selftest --help
step ops "$PY" -m pytest -q tests/ops tests/metal -- "$PY" -m pytest -q --collect-only tests/ops tests/metal
step guard "$PY" -m pytest -q tests/mps -- "$PY" -m pytest -q --collect-only tests/mps
for m in tiny-llama tiny-moe; do
  step "quantize_$m" "$PY" -m calibra quantize "builtin:$m" --method gptq --device mps --output "$OUT/q-$m" \
    -- "$PY" -m calibra quantize --help
done
step bench_w4a16_gemv "$PY" benchmarks/bench_w4a16_gemv.py --device mps --repeat 20 \
  -- bash -c "$(declare -f accepts); PY=$(printf %q "$PY"); accepts benchmarks/bench_w4a16_gemv.py --device --repeat \
  && \$PY benchmarks/bench_w4a16_gemv.py --device cpu --quick --repeat 1 --chip 'Apple M2'"
step bench_quantize_vs_clone "$PY" benchmarks/bench_quantize.py --device mps --repeat 7 \
  -- bash -c "$(declare -f accepts); PY=$(printf %q "$PY"); accepts benchmarks/bench_quantize.py --device --repeat"

"$PY" - "$OUT" "$DRY" <<'PYEOF'
import json, sys
out, dry = sys.argv[1], sys.argv[2] == "1"
steps = [dict(zip(("name", "status"), l.rstrip("\n").split("\t"))) for l in open(f"{out}/steps.tsv") if l.strip()]
json.dump({"dry_run": dry, "steps": steps}, open(f"{out}/summary.json", "w"), indent=1)
PYEOF
exit $failed
