"""calibra::hessian_accumulate (H += X^T X) against the fp64 product.

Float rule: |ours - exact| <= 2 |torch_lowp - exact| + atol elementwise, where exact is the fp64
H0 + X^T X and torch_lowp is torch's own fp32 computation H0 + X.T @ X with X converted to fp32.
For fp16/bf16 x that conversion is exact, so the fp32 matmul of the upcast x is the fair baseline:
our kernel computes the same products in fp32 (torch's fp16/bf16 matmul would round the result to
16 bits, a baseline too lax to mean anything). atol = 1e-6 * N * max|x|^2 (+ the same times |H0|).
"""

import pytest
import torch

import calibra
from calibra.ops import _ref
from tests.ops.harness import DEVICES, assert_close_2x, noncontiguous, run_native

OP = "hessian_accumulate"


def exact_of(H0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    X = x.detach().cpu().double().reshape(-1, x.shape[-1])
    return H0.cpu().double() + X.T @ X


def lowp_of(H0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    X = x.detach().cpu().float().reshape(-1, x.shape[-1])
    return H0.cpu().float() + X.T @ X


def atol_of(H0: torch.Tensor, x: torch.Tensor) -> float:
    n = max(1, x.numel() // max(1, x.shape[-1]))
    m = x.detach().abs().max().item() if x.numel() else 0.0
    return 1e-6 * n * max(m * m, 1e-30) + 1e-6 * (H0.abs().max().item() if H0.numel() else 0.0)


def sym(d: int, dtype, device, scale=1.0) -> torch.Tensor:
    a = torch.randn(d, d, dtype=torch.float64)
    return ((a + a.T) * scale).to(dtype).to(device)


def check_float(H: torch.Tensor, H0: torch.Tensor, x: torch.Tensor, what: str) -> None:
    assert torch.equal(H, H.T), f"{what}: H is not exactly symmetric"
    if H.dtype == torch.float64:
        exact = exact_of(H0, x)
        err = (H.cpu() - exact).abs().max().item()
        assert err <= 1e-9 * max(1.0, exact.abs().max().item()), f"{what}: fp64 error {err}"
    else:
        assert_close_2x(H, exact_of(H0, x), lowp_of(H0, x), atol_of(H0, x), what)


SHAPES = [(1, 1), (5, 1), (1, 3), (5, 3), (1000, 17), (5, 100), (1000, 100), (1000, 257), (37, 64), (300, 96), (7, 200)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,d", SHAPES)
def test_odd_shapes(device, hdtype, N, d):
    if device == "mps" and hdtype == torch.float64:
        pytest.skip("MPS has no float64")
    torch.manual_seed(N * 1000 + d)
    x = torch.randn(N, d, device=device)
    H0 = sym(d, hdtype, device)
    H = H0.clone()
    out = run_native(OP, lambda: calibra.ops.hessian_accumulate(H, x), device)
    assert out is H
    check_float(H, H0, x, f"N={N} d={d} {hdtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("hdtype", [torch.float32, torch.float64])
def test_input_dtypes(device, xdtype, hdtype):
    if device == "mps" and torch.float64 in (xdtype, hdtype):
        pytest.skip("MPS has no float64")
    torch.manual_seed(3)
    x = (torch.randn(4, 50, 130) * 3).to(xdtype).to(device)
    H0 = torch.zeros(130, 130, dtype=hdtype, device=device)
    H = H0.clone()
    run_native(OP, lambda: calibra.ops.hessian_accumulate(H, x), device)
    if hdtype == torch.float32 and xdtype == torch.float64:
        # fp32 H: x is rounded to fp32 first, so the exact value is that of the rounded x
        x = x.float()
    check_float(H, H0, x, f"x {xdtype} H {hdtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,d", [(1, 1), (31, 17), (33, 64), (100, 130), (1000, 257), (4097, 192)])
def test_half_inputs_odd_shapes(device, xdtype, N, d):
    """fp16/bf16 x into a float32 H: on CUDA the tensor-core kernel (partial token steps of 32, partial
    64-channel tiles, several tiles per row of H)."""
    torch.manual_seed(N + d)
    x = (torch.randn(N, d) * 2).to(xdtype).to(device)
    H0 = sym(d, torch.float32, device)
    H = H0.clone()
    run_native(OP, lambda: calibra.ops.hessian_accumulate(H, x), device)
    check_float(H, H0, x, f"N={N} d={d} x {xdtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_3d_and_noncontiguous(device):
    torch.manual_seed(4)
    base = torch.randn(3, 40, 72, device=device)
    for name, x in [
        ("3-D", base),
        ("strided last dim", noncontiguous(base)),
        ("transposed leading dims", base.transpose(0, 1)),
        ("transposed 2-D view", torch.randn(72, 90, device=device).T),
    ]:
        assert name == "3-D" or not x.is_contiguous()
        H0 = sym(72, torch.float32, device)
        H = H0.clone()
        run_native(OP, lambda: calibra.ops.hessian_accumulate(H, x), device)
        check_float(H, H0, x, name)


@pytest.mark.parametrize("device", DEVICES)
def test_accumulation_over_calls(device):
    torch.manual_seed(5)
    parts = [torch.randn(n, 160, device=device) for n in (100, 1, 517, 400)]
    H = torch.zeros(160, 160, device=device)
    for p in parts:
        run_native(OP, lambda: calibra.ops.hessian_accumulate(H, p), device)
    whole = torch.cat(parts)
    H_one = torch.zeros(160, 160, device=device)
    calibra.ops.hessian_accumulate(H_one, whole)
    zero = torch.zeros(160, 160)
    assert torch.equal(H, H.T)
    assert_close_2x(H, exact_of(zero, whole), lowp_of(zero, whole), atol_of(zero, whole), "several calls")
    assert_close_2x(H_one, exact_of(zero, whole), lowp_of(zero, whole), atol_of(zero, whole), "one call")
    torch.testing.assert_close(H, H_one, rtol=1e-5, atol=atol_of(zero, whole))


@pytest.mark.parametrize("device", DEVICES)
def test_large_k_blocks(device):
    # several K chunks and several H blocks on each side, with edges on both
    torch.manual_seed(6)
    x = torch.randn(1000, 450, device=device)
    for hdtype in (torch.float32, torch.float64):
        if device == "mps" and hdtype == torch.float64:
            continue
        H0 = sym(450, hdtype, device, scale=10.0)
        H = H0.clone()
        run_native(OP, lambda: calibra.ops.hessian_accumulate(H, x), device)
        check_float(H, H0, x, f"1000x450 {hdtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_is_noop(device):
    H0 = sym(8, torch.float32, device)
    H = H0.clone()
    run_native(OP, lambda: calibra.ops.hessian_accumulate(H, torch.empty(0, 8, device=device)), device)
    assert torch.equal(H, H0)
    run_native(OP, lambda: calibra.ops.hessian_accumulate(H, torch.empty(2, 0, 8, device=device)), device)
    assert torch.equal(H, H0)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_cpu_fallback_kernels(monkeypatch, isa):
    """The AVX2 and portable micro-kernels (picked at run time on older CPUs) give the same results."""
    monkeypatch.setenv("CALIBRA_CPU_ISA", isa)
    torch.manual_seed(7)
    for N, d in [(1000, 257), (3, 5), (450, 130)]:
        x = torch.randn(N, d)
        for hdtype in (torch.float32, torch.float64):
            H0 = sym(d, hdtype, "cpu")
            H = H0.clone()
            run_native(OP, lambda: calibra.ops.hessian_accumulate(H, x), "cpu")
            check_float(H, H0, x, f"{isa} {N}x{d} {hdtype}")


def test_reference_matches_exact():
    torch.manual_seed(8)
    x = torch.randn(2, 30, 40)
    H0 = sym(40, torch.float32, "cpu")
    H = H0.clone()
    _ref.hessian_accumulate(H, x)
    assert torch.equal(H, exact_of(H0, x).float())


def test_nan_propagates():
    # NaN/Inf policy: not checked (the calibration engine checks activations); they propagate.
    x = torch.randn(10, 32)
    x[3, 5] = float("nan")
    H = torch.zeros(32, 32)
    calibra.ops.hessian_accumulate(H, x)
    assert torch.isnan(H[5]).all() and torch.isnan(H[:, 5]).all()
    mask = torch.ones(32, dtype=torch.bool)
    mask[5] = False
    assert torch.isfinite(H[mask][:, mask]).all()


def test_opcheck():
    x = torch.randn(3, 5, 24)
    H = sym(24, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.calibra.hessian_accumulate.default, (H, x))
    torch.library.opcheck(
        torch.ops.calibra.hessian_accumulate.default, (torch.zeros(7, 7, dtype=torch.float64), torch.randn(9, 7))
    )


@pytest.mark.parametrize(
    "H,x,err,match",
    [
        (
            torch.zeros(4096, 4095),
            torch.randn(2, 4096),
            ValueError,
            r"\[hessian_accumulate\] H must be \[d, d\] with d = x.shape\[-1\] = 4096, got \[4096, 4095\]",
        ),
        (torch.zeros(8), torch.randn(2, 8), ValueError, r"\[hessian_accumulate\] H must be \[d, d\] .* got \[8\]"),
        (
            torch.zeros(8, 8, dtype=torch.float16),
            torch.randn(2, 8),
            TypeError,
            r"\[hessian_accumulate\] H must be one of float32, float64, got float16",
        ),
        (
            torch.zeros(8, 8),
            torch.ones(2, 8, dtype=torch.int32),
            TypeError,
            r"\[hessian_accumulate\] x must be one of float32, float16, bfloat16, float64, got int32",
        ),
        (torch.zeros(8, 16)[:, ::2], torch.randn(2, 8), ValueError, r"\[hessian_accumulate\] H must be contiguous"),
        (torch.zeros(1, 1), torch.tensor(1.0), ValueError, r"\[hessian_accumulate\] x must have at least 1 dims"),
        (
            torch.zeros(8, 8),
            torch.randn(2, 8, device="meta"),
            ValueError,
            r"\[hessian_accumulate\] all tensors must be on one device, got H on cpu, x on meta",
        ),
    ],
)
def test_bad_input(H, x, err, match):
    with pytest.raises(err, match=match):
        calibra.ops.hessian_accumulate(H, x)


def test_selftest_example():
    from calibra.selftest import run_selftest

    assert run_selftest("cpu")
