"""tools/mac_check.sh --dry-run: the Mac check rehearsed on Linux, so a path or flag mistake in it is found in
CI (the MPS-guard lane, tests/mps, runs in the main pytest session)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mac_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "mac_check.sh"), str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True
    status = {s["name"]: s["status"] for s in summary["steps"]}
    run = ["build", "info", "selftest", "ops", "guard", "quantize_tiny-llama", "quantize_tiny-moe"]
    assert all(status[n] == "dry-run ok" for n in run), status
    assert status["bench_w4a16_gemv"] == "dry-run ok" and status["bench_quantize_vs_clone"] == "dry-run ok"
    # the rehearsal ran the GEMV driver on the CPU: the native kernel served it and the table was printed
    log = (tmp_path / "bench_w4a16_gemv.log").read_text()
    assert "| quick | 512x256 | cpu " in log and "Apple's figure for M2" in log
    assert "--device mps" in (tmp_path / "bench_w4a16_gemv.cmd").read_text()
    assert "--device mps" in (tmp_path / "quantize_tiny-llama.cmd").read_text()
