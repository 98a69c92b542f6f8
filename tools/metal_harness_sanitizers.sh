#!/usr/bin/env bash
# Sanitizer lane for the Metal CPU harness: builds metal/harness with ThreadSanitizer and with
# AddressSanitizer + UndefinedBehaviorSanitizer. ASan/UBSan: tests/metal runs against that build (the
# runtime LD_PRELOADed into python). TSan: tests/metal records its launches, and the TSan build of
# metal_harness_replay re-runs them and checks every output byte. A missing threadgroup barrier shows up
# as a TSan data race; an out-of-bounds buffer or threadgroup-array access as an ASan report.
#
# The missing-barrier test is run separately under TSan and must produce a race report: that is
# the sanitizer catching the deliberately removed barrier.
#
# Usage: tools/metal_harness_sanitizers.sh        (about 2-4 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=python
lib_of() { "${CXX:-g++}" -print-file-name="$1"; }
status=0

echo "== ThreadSanitizer"
# A TSan runtime cannot be preloaded into python + torch (it crashes), so the tests record their
# launches (inputs and checked outputs) and the TSan-built replay tool re-runs them.
rec=build/metal-harness-launches
rm -rf "$rec" "$rec-nobarrier"
CALIBRA_METAL_HARNESS_RECORD=$rec python -m pytest -q -p no:cacheprovider tests/metal -k "not missing_barrier" >/dev/null
CALIBRA_METAL_HARNESS_RECORD=$rec-nobarrier python -m pytest -q -p no:cacheprovider tests/metal -k missing_barrier >/dev/null
cmake -S metal/harness -B build/metal-harness-tsan -DCALIBRA_METAL_SANITIZE=thread >/dev/null
cmake --build build/metal-harness-tsan -j2 >/dev/null
TSAN_OPTIONS="halt_on_error=1" build/metal-harness-tsan/metal_harness_replay "$rec"/*.launch || status=1
echo "== ThreadSanitizer on the kernel without its barrier (a race report is expected)"
nb=$(grep -l "^cal_hadamard_nobarrier" "$rec-nobarrier"/*.launch)
out=$(TSAN_OPTIONS="halt_on_error=0 exitcode=0" build/metal-harness-tsan/metal_harness_replay $nb 2>&1 || true)
if grep -q "WARNING: ThreadSanitizer: data race" <<<"$out" && grep -q "cal_hadamard_nobarrier" <<<"$out"; then
  echo "ok: TSan reports the data race in cal_hadamard_nobarrier"
else
  echo "FAIL: TSan did not report the race of the barrier-less kernel"; echo "$out" | tail -40; status=1
fi

echo "== AddressSanitizer + UndefinedBehaviorSanitizer"
asan=$(lib_of libasan.so); ubsan=$(lib_of libubsan.so)
export CALIBRA_METAL_HARNESS_BUILD=build/metal-harness-asan CALIBRA_METAL_SANITIZE=address,undefined
ASAN_OPTIONS="detect_leaks=0 halt_on_error=1" UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1" \
  LD_PRELOAD="$asan $ubsan" python -m pytest -q -p no:cacheprovider tests/metal || status=1

exit $status
