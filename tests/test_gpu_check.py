"""tools/gpu_check.sh --dry-run: the GPU check rehearsed on the CPU, so that a path or flag mistake in it
is found here and cannot waste GPU minutes. Also the validator itself, fed deliberately wrong commands."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STEPS = [
    "configure",
    "build",
    "info",
    "selftest",
    "tests",
    "memcheck",
    "racecheck",
    "bench_gemm",
    "bench_hessian",
    "bench_quantize",
    "bench_hadamard",
    "gptq_8b_layer",
    "bench_gptq",
]


def _lib():
    spec = importlib.util.spec_from_file_location("gpu_check_lib", ROOT / "tools" / "gpu_check_lib.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    # the calibra this test imported (the tree's in-place build, or the installed package in CI), so the
    # dry run's CPU rehearsals find the same native kernels
    import calibra

    where = str(Path(calibra.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": where}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True, env=env, timeout=300
    )
    return proc, out


def test_dry_run_passes_and_writes_the_summary(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert [s["name"] for s in summary["steps"]] == STEPS
    for s in summary["steps"]:
        assert s["status"] == "dry-run ok", s
        assert {"name", "status", "rc", "seconds", "log"} <= set(s)
        assert Path(s["log"]).is_file(), s
    for key in ("gpu", "torch", "torch_cuda", "git_commit", "dry_run"):
        assert key in summary["machine"], key
    assert "13/13 steps ok" in proc.stdout


def test_dry_run_logs_show_the_commands_and_the_cpu_rehearsals(dry_run):
    _, out = dry_run
    tests = (out / "tests.log").read_text()
    assert "-k cuda" in tests and "pytest selects" in tests
    mem = (out / "memcheck.log").read_text()
    assert "--tool memcheck" in mem and "ops ran natively on cpu" in mem
    assert "codes equal to the reference" in (out / "gptq_8b_layer.log").read_text()


@pytest.mark.parametrize(
    "argv, why",
    [
        (["python", "benchmarks/bench_gemm.py", "--quikc"], "does not accept --quikc"),
        (["python", "benchmarks/bench_nothing.py"], "does not exist"),
        (["python", "-m", "calibra", "selftest", "--devcie", "cuda"], "does not accept --devcie"),
        (["python", "-m", "pytest", "-q", "tests/no_such_dir", "-k", "cuda"], "does not exist"),
        (["python", "-m", "pytest", "-q", "tests/ops", "-k", "no_test_has_this_name"], "selects no test"),
        (["compute-sanitizer", "--tool", "memchek", "python", "x.py"], "no tool 'memchek'"),
        (["cmake", "-S", ".", "-B", "b", "-DCALIBRA_CUDAA=ON"], "CALIBRA_CUDAA is not defined"),
        (["cmake", "--build", "b", "--target", "_cpu", "_cudaa"], "_cudaa is not defined"),
        (["python", "tools/gpu_check_kernels.py", "gpt", "--device", "cuda"], "exited 2"),
    ],
)
def test_validator_catches_wrong_commands(argv, why):
    lib = _lib()
    with pytest.raises(lib.CheckError, match=why.replace("(", r"\(")):
        lib.validate_command(argv)


def test_validator_accepts_a_good_command():
    lib = _lib()
    assert lib.validate_command(["env", "X=1", "python", "benchmarks/bench_hessian.py", "--device", "cuda"]) == []
