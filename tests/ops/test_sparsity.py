"""calibra::nm_mask, compress_24, decompress_24 against the reference and hand-computed values."""

import pytest
import torch

import calibra
from calibra.ops import _ref
from tests.ops.harness import DEVICES, noncontiguous, run_native

NM = [(2, 4), (4, 8), (1, 4), (3, 8), (16, 32), (1, 2), (2, 6)]


def sparse24(rows, k, dtype=torch.float32, device="cpu", seed=0):
    """A random 2:4-sparse matrix with groups of 0, 1 and 2 nonzeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g)
    keep = torch.rand(rows, k // 4, 4, generator=g).argsort(-1) < torch.randint(0, 3, (rows, k // 4, 1), generator=g)
    return (w * keep.reshape(rows, k)).to(dtype).to(device)


# ---- nm_mask -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nm_mask_equals_reference(device, n, m, dtype):
    torch.manual_seed(n * 100 + m)
    s = torch.randn(3, 5, 4 * m).to(dtype).to(device)
    for inp in (s, s.transpose(0, 1), noncontiguous(s)):
        ours = run_native("nm_mask", lambda: calibra.ops.nm_mask(inp, n, m), device)
        assert ours.dtype == torch.bool and ours.shape == inp.shape and ours.is_contiguous()
        assert torch.equal(ours.cpu(), _ref.nm_mask(inp.cpu(), n, m))
        # exactly n kept per group, and every kept score >= every dropped score
        g = ours.cpu().reshape(-1, m)
        assert (g.sum(-1) == n).all()
        sg = inp.cpu().float().reshape(-1, m)
        kept_min = torch.where(g, sg, torch.inf).min(-1).values
        dropped_max = torch.where(g, -torch.inf, sg).max(-1).values
        assert (kept_min >= dropped_max).all()
        # deterministic
        assert torch.equal(calibra.ops.nm_mask(inp, n, m), ours)


@pytest.mark.parametrize("device", DEVICES)
def test_nm_mask_ties_go_to_lower_index(device):
    s = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, -0.0, 0.0, -0.0, 0.0, 5.0, 3.0, 3.0, 5.0]], device=device
    )
    ours = run_native("nm_mask", lambda: calibra.ops.nm_mask(s, 2, 4), device)
    expect = [[True, True, False, False, False, True, True, False, True, True, False, False, True, False, False, True]]
    assert ours.tolist() == expect
    assert _ref.nm_mask(s.cpu(), 2, 4).tolist() == expect
    big = torch.zeros(2, 64, dtype=torch.float16, device=device)
    assert calibra.ops.nm_mask(big, 3, 8).cpu().reshape(-1, 8)[:, :3].all()
    assert not calibra.ops.nm_mask(big, 3, 8).cpu().reshape(-1, 8)[:, 3:].any()


@pytest.mark.parametrize("device", DEVICES)
def test_nm_mask_nan(device):
    s = torch.randn(2, 3, 8, device=device)
    s[1, 2, 5] = float("nan")
    s[1, 2, 7] = float("nan")
    msg = r"\[nm_mask\] scores must not contain NaN \(found NaN at index \[1, 2, 5\]\)"
    with pytest.raises(ValueError, match=msg):
        run_native("nm_mask", lambda: calibra.ops.nm_mask(s, 2, 4), device)
    with pytest.raises(ValueError, match=msg):
        _ref.nm_mask(s.cpu(), 2, 4)


@pytest.mark.parametrize(
    "args,err,match",
    [
        (
            (torch.randn(4, 10), 2, 4),
            ValueError,
            r"\[nm_mask\] the last dim of scores \(10\) must be a multiple of m = 4",
        ),
        ((torch.randn(4, 8), 0, 4), ValueError, r"\[nm_mask\] n must satisfy 0 < n < m = 4, got 0"),
        ((torch.randn(4, 8), 4, 4), ValueError, r"\[nm_mask\] n must satisfy 0 < n < m = 4, got 4"),
        ((torch.randn(4, 64), 2, 64), ValueError, r"\[nm_mask\] m must be in \[2, 32\], got 64"),
        ((torch.ones(4, 8, dtype=torch.int32), 2, 4), TypeError, r"\[nm_mask\] scores must be one of"),
        ((torch.ones(4, 8, dtype=torch.float64), 2, 4), TypeError, r"\[nm_mask\] scores must be one of"),
        ((torch.tensor(1.0), 1, 2), ValueError, r"\[nm_mask\] scores must have at least 1 dims"),
    ],
)
def test_nm_mask_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        calibra.ops.nm_mask(*args)


# ---- compress_24 / decompress_24 --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16), (5, 48), (33, 256)])
def test_compress_equals_reference_and_round_trips(device, dtype, shape):
    w = sparse24(*shape, dtype=dtype, device=device, seed=shape[0])
    for inp in (w, w.t().contiguous().t(), noncontiguous(w)):
        values, meta = run_native("compress_24", lambda: calibra.ops.compress_24(inp), device)
        rv, rm = _ref.compress_24(inp.cpu())
        assert values.dtype == dtype and meta.dtype == torch.int16
        assert values.shape == (shape[0], shape[1] // 2) and meta.shape == (shape[0], shape[1] // 16)
        assert torch.equal(values.cpu(), rv) and torch.equal(meta.cpu(), rm)
        dense = run_native("decompress_24", lambda: calibra.ops.decompress_24(values, meta), device)
        assert torch.equal(dense.cpu(), w.cpu())
        assert torch.equal(_ref.decompress_24(rv, rm), w.cpu())
    # strided inputs to decompress
    dense = run_native(
        "decompress_24", lambda: calibra.ops.decompress_24(noncontiguous(values), meta.t().contiguous().t()), device
    )
    assert torch.equal(dense.cpu(), w.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_meta_hand_computed(device):
    w = torch.zeros(2, 16, device=device)
    w[0, 0], w[0, 3] = 1.0, 2.0  # group 0: indices 0, 3 -> 0 | 3<<2 = 0xC
    # group 1: empty -> filled with 0, 1 -> 0x4
    w[0, 10] = 3.0  # group 2: one nonzero at 2 -> 0, 2 -> 0x8
    w[0, 13], w[0, 14] = 4.0, 5.0  # group 3: 1, 2 -> 0x9
    w[1, 3] = 6.0  # group 0: 0, 3 -> 0xC; groups 1..3 empty -> 0x4
    values, meta = run_native("compress_24", lambda: calibra.ops.compress_24(w), device)
    words = [int(v) & 0xFFFF for v in meta.cpu().flatten()]
    assert words == [0x984C, 0x444C]
    assert values.cpu().tolist() == [[1.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0, 5.0], [0.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    assert [int(v) & 0xFFFF for v in _ref.compress_24(w.cpu())[1].flatten()] == words


@pytest.mark.parametrize("device", DEVICES)
def test_not_24_sparse(device):
    w = sparse24(3, 32, device=device)
    w[1, 20:24] = torch.tensor([1.0, 2.0, 0.0, 3.0])
    w[2, 0:4] = 1.0
    msg = r"\[compress_24\] w is not 2:4 sparse: row 1, columns 20\.\.23 hold 3 nonzeros"
    with pytest.raises(ValueError, match=msg):
        run_native("compress_24", lambda: calibra.ops.compress_24(w), device)
    with pytest.raises(ValueError, match=msg):
        _ref.compress_24(w.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_meta(device):
    values, meta = calibra.ops.compress_24(sparse24(3, 32, device=device))
    meta = meta.clone()
    meta[2, 1] = 0x1234  # group 0: 0, 1 (fine); group 1: 3, 0 (bad)
    msg = (
        r"\[decompress_24\] meta\[2, 1\] = 0x1234 is not valid 2:4 metadata: group 1 holds indices 3, 0, "
        r"which must be distinct and ascending"
    )
    with pytest.raises(ValueError, match=msg):
        run_native("decompress_24", lambda: calibra.ops.decompress_24(values, meta), device)
    with pytest.raises(ValueError, match=msg):
        _ref.decompress_24(values.cpu(), meta.cpu())


def test_negative_zero_counts_as_zero():
    w = torch.zeros(1, 16)
    w[0, 0:4] = torch.tensor([-0.0, 1.0, -0.0, 2.0])
    values, meta = calibra.ops.compress_24(w)
    assert int(meta[0, 0]) & 0xF == (1 | 3 << 2)


@pytest.mark.parametrize(
    "fn,err,match",
    [
        (
            lambda: calibra.ops.compress_24(torch.zeros(4, 20)),
            ValueError,
            r"\[compress_24\] the last dim of w \(20\) must be a multiple of 16",
        ),
        (lambda: calibra.ops.compress_24(torch.zeros(4, 4, 16)), ValueError, r"\[compress_24\] w must be 2-D"),
        (
            lambda: calibra.ops.compress_24(torch.zeros(4, 16, dtype=torch.float64)),
            TypeError,
            r"\[compress_24\] w must be one of",
        ),
        (
            lambda: calibra.ops.decompress_24(torch.zeros(4, 8), torch.zeros(4, 2, dtype=torch.int16)),
            ValueError,
            r"\[decompress_24\] values \(4, 8\) and meta \(4, 2\) do not match",
        ),
        (
            lambda: calibra.ops.decompress_24(torch.zeros(4, 8), torch.zeros(4, 1, dtype=torch.int32)),
            TypeError,
            r"\[decompress_24\] meta must be one of int16",
        ),
    ],
)
def test_24_bad_input(fn, err, match):
    with pytest.raises(err, match=match):
        fn()


def test_opcheck():
    torch.library.opcheck(torch.ops.calibra.nm_mask.default, (torch.randn(3, 4, 16), 2, 4))
    torch.library.opcheck(torch.ops.calibra.nm_mask.default, (torch.randn(3, 24).to(torch.bfloat16), 3, 8))
    w = sparse24(4, 32)
    torch.library.opcheck(torch.ops.calibra.compress_24.default, (w,))
    values, meta = calibra.ops.compress_24(w.half())
    torch.library.opcheck(torch.ops.calibra.decompress_24.default, (values, meta))
