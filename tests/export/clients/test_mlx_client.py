"""MLX affine exports through mlx-lm (``mlx_lm.load``) on the CPU, optional lane.

Tolerance: max |logits - simulated| <= 1e-3; both sides compute in float32 from the same codes,
scales and biases (mlx's quantized matmul accumulates in a different order).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import calibra.export as E  # noqa: E402
from calibra.quant import RTNConfig  # noqa: E402
from tests.export import _qmodel as Q  # noqa: E402
from tests.export.clients._lane import max_diff, model_and_tokenizer, report  # noqa: E402

TOL = 1e-3


@pytest.mark.parametrize(
    "case,cfg",
    [
        ("int4-g32-sym", RTNConfig(bits=4, group_size=32, sym=True)),
        ("int4-g64-asym", RTNConfig(bits=4, group_size=64, sym=False)),
        ("int8-g32-asym", RTNConfig(bits=8, group_size=32, sym=False)),
    ],
)
def test_mlx_lm_loads(tmp_path, case, cfg):
    import mlx.core as mx
    from mlx_lm import load

    model, tok, source = model_and_tokenizer()
    x = Q.ids()
    dense = Q.logits(model, x)
    qm = Q.quantize(model, tok, cfg, source=source)
    p = E.export(qm, tmp_path / "mlx", "mlx")[0]
    mlx_model, _ = load(str(p))
    out = np.array(mlx_model(mx.array(x.numpy())).astype(mx.float32))
    ref = Q.logits(qm.model, x)
    diff = max_diff(out, ref)
    report("mlx-lm", case, diff, TOL, f"(quantization itself: {max_diff(ref, dense):.3f})")
    assert diff <= TOL and max_diff(ref, dense) > 10 * TOL
