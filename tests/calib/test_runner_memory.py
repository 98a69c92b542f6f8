"""The runner's working memory does not grow with the model's depth (benchmarks/bench_calibration_memory.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_calibration_memory.py"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux) to read RSS")
def test_working_memory_bounded_by_about_one_layer():
    rows = {}
    for n in (2, 12):
        res = subprocess.run(
            [sys.executable, str(BENCH), "--one", str(n), "--samples", "4", "--seq-len", "128", "--batch-size", "2"],
            capture_output=True,
            text=True,
            check=True,
        )
        # (the subprocess imports the same calibra as the tests: installed, or the tree on PYTHONPATH)
        rows[n] = json.loads(res.stdout.strip().splitlines()[-1])
    model_growth = rows[12]["model_MiB"] - rows[2]["model_MiB"]  # 10 layers of weights (~30 MiB)
    work_growth = rows[12]["working_MiB"] - rows[2]["working_MiB"]
    # a runner that kept every layer's activations or copied the model would grow by >= model_growth
    assert work_growth < 0.5 * model_growth, rows
    assert rows[12]["working_MiB"] < rows[2]["working_MiB"] + 4 * rows[2]["layer_MiB"], rows
