"""The MPS-guard lane: jobs run on the CPU under calibra.mps.guard, which refuses float64 and every aten op
PyTorch's MPS backend has no kernel for, outside the steps calibra runs on the CPU on a Mac. Each job's output
must equal the plain CPU run's (the MPS path moves float64 steps to the CPU; it does not change numbers).

What this proves without a Mac: no job needs what MPS lacks. What it cannot: that Apple's MPS kernels give
the same floats as the CPU's (docs/mac.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import calibra  # noqa: E402
import calibra.kv  # noqa: E402
from calibra import mps  # noqa: E402
from calibra.data import CalibrationConfig  # noqa: E402
from calibra.mps.guard import MpsLimitError, mps_guard  # noqa: E402
from calibra.mps.unsupported_ops import UNSUPPORTED_OPS  # noqa: E402
from calibra.prune.config import PruningConfig  # noqa: E402
from calibra.quant import GPTQConfig, MRGPTQConfig, RTNConfig  # noqa: E402
from tests.regress.test_output_hashes import folder_digest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("builtin:tiny-llama", "builtin:tiny-moe")


def _cal():
    return CalibrationConfig(num_samples=4, sequence_length=64, seed=0)


def _quantize(config):
    def run(model, out):
        calibra.quantize(model, config, _cal(), output=out, evaluate=False, progress=False, echo=None)

    return run


def _prune(config):
    def run(model, out):
        calibra.prune(model, config, _cal(), output=out, evaluate=False, progress=False, echo=None)

    return run


def _kv(model, out):
    preset = calibra.kv.calibrate(model, _cal(), rank=4, targets="kv", evaluate=False, progress=False, echo=None)
    out.mkdir()
    preset.save(out / "kv_preset.json")


JOBS = {
    "gptq": _quantize(GPTQConfig(bits=4, group_size=32)),
    "mr-gptq": _quantize(MRGPTQConfig(format="nvfp4")),
    "rtn": _quantize(RTNConfig(bits=4, group_size=32)),
    "sparsegpt": _prune(PruningConfig(method="sparsegpt", target_sparsity=0.5)),
    "wanda": _prune(PruningConfig(method="wanda", pattern="2:4")),
    "kv-calibrate": _kv,
}


def _untimed(doc):
    """A JSON document without its timings (the kv preset records how long calibration took)."""
    if isinstance(doc, dict):
        return {k: _untimed(v) for k, v in doc.items() if k != "seconds"}
    return [_untimed(v) for v in doc] if isinstance(doc, list) else doc


def _digest(folder: Path) -> dict:
    """folder_digest (every tensor's bytes, calibra's JSON files), JSON compared without timings."""
    out = folder_digest(folder)
    for p in folder.rglob("*.json"):
        key = p.relative_to(folder).as_posix()
        if key in out:
            out[key] = json.dumps(_untimed(json.loads(p.read_text())), sort_keys=True)
    return out


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_within_mps_limits_equals_cpu(job, model, tmp_path):
    JOBS[job](model, tmp_path / "cpu")
    with mps_guard() as guard:
        JOBS[job](model, tmp_path / "mps")
    assert guard.checked > 100, "the guard saw (almost) nothing of the job"
    want, got = _digest(tmp_path / "cpu"), _digest(tmp_path / "mps")
    assert want, "the job wrote nothing that is hashed"
    changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    assert not changed, f"{job} on {model}: {len(changed)} of {len(want)} items differ from the CPU run: {changed[:5]}"


# ---- the guard itself ---------------------------------------------------------------------------


def test_guard_refuses_float64_outside_host_steps():
    x = torch.randn(4)
    with mps_guard():
        x * 2  # float32: fine
        with pytest.raises(MpsLimitError, match="float64"):
            x.double()
        with mps.on_host():
            y = x.double().sum()  # a declared CPU step
        with pytest.raises(MpsLimitError, match="float64"):
            y + 1  # a float64 result that leaks out of its host step


def test_guard_refuses_ops_mps_lacks():
    assert "frexp.Tensor" in UNSUPPORTED_OPS and "_linalg_eigh.default" in UNSUPPORTED_OPS
    with mps_guard():
        with pytest.raises(MpsLimitError, match="frexp"):
            torch.frexp(torch.ones(3))
        with pytest.raises(MpsLimitError, match="eigh"):
            torch.linalg.eigh(torch.eye(3))


def test_guard_sets_mps_semantics_and_serves_calibra_ops_as_mps_would():
    assert not mps.mps_semantics("cpu")
    w = torch.randn(8, 64)
    h = torch.zeros(64, 64)
    with mps_guard() as guard:
        assert mps.mps_semantics("cpu")
        calibra.ops.quantize(w, bits=4, group_size=32)  # a Metal kernel exists: served natively
        calibra.ops.hessian_accumulate(h, w)
        with pytest.raises(MpsLimitError, match="float64"):
            calibra.ops.hessian_accumulate(torch.zeros(64, 64, dtype=torch.float64), w)
    assert guard.calibra_ops == {"quantize_int": "metal", "hessian_accumulate": "metal"}


def test_float64_ladder_rung_runs_on_the_host():
    """The ladder's float64 rung (reached when float32 fails at every damping) is a host step under the guard,
    and U comes back float32, equal to the CPU path's. The rung is asked for directly (``dtypes``)."""
    from calibra.quant.gptq import factor_inverse_hessian

    class Cfg:
        damp_percent, damp_ladder = 0.01, (0.1,)

    a = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    h = a.T @ a
    cpu = factor_inverse_hessian(h, Cfg, 1.0, subject="[t]", dtypes=(torch.float64,))
    with mps_guard():
        got = factor_inverse_hessian(h, Cfg, 1.0, subject="[t]", dtypes=(torch.float64,))
        with pytest.raises(MpsLimitError, match="float64"):  # the same rung without the host step
            with mps.on_host():
                pass
            torch.linalg.cholesky_ex(h.double())
    assert cpu.float64 and got.float64
    assert got.u.dtype == torch.float32 and torch.equal(got.u, cpu.u)


def test_float64_hessian_is_prepared_and_factored_on_the_host():
    """hessian_dtype="float64" statistics (and MR-GPTQ's rotated H) give a float64 H: on MPS it is made,
    permuted (act-order) and factored on the CPU; the result equals the CPU path's."""
    from calibra.quant.gptq import gptq_quantize

    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g, dtype=torch.float64)
    h = x.T @ x
    w = torch.randn(16, 64, generator=g)
    cfg = GPTQConfig(bits=4, group_size=32, desc_act=True)
    cpu = gptq_quantize(w, h, 256, cfg)
    with mps_guard():
        got = gptq_quantize(w, h, 256, cfg)
    assert torch.equal(got.codes, cpu.codes) and torch.equal(got.weight, cpu.weight)
    assert got.log.loss == cpu.log.loss


def test_unsupported_ops_file_is_current():
    """The list is generated from the installed torch's op table; CI pins the torch it was made with."""
    from calibra.mps.unsupported_ops import TORCH_VERSION

    assert torch.__version__.split("+")[0] == TORCH_VERSION, (
        f"torch {torch.__version__} differs from the list's {TORCH_VERSION}: run tools/gen_mps_unsupported_ops.py"
    )
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_mps_unsupported_ops.py"), "--check"])
    assert proc.returncode == 0, "calibra/mps/unsupported_ops.py is stale: run tools/gen_mps_unsupported_ops.py"
