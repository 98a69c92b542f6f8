"""Inference GEMMs (w4a16_gemm, sparse24_gemm) and their layout helpers (w4a16_repack, sparse24_reorder_meta).

Layout helpers are checked bit for bit against the reference AND against an independent derivation from
the PTX ISA fragment tables (what each lane's registers must hold for mma.sync.m16n8k16 B and
mma.sp.m16n8k32 metadata), simulating the kernel's own decode steps. The CUDA parametrizations skip
without a GPU; on a GPU they assert the native kernel ran and compare it with the reference.
"""

import pytest
import torch

import calibra
from calibra.ops import _ref
from calibra.ops import gemm as G
from calibra.ops._ref import gemm as R
from tests.ops.harness import DEVICES, assert_close_2x, run_native

# the 2:4 ops have no Metal kernel (docs/backends.md): on MPS they run their references, nothing native to assert
NO_METAL_SPARSE24 = [d for d in DEVICES if d.id != "mps"]

ACT = [torch.float16, torch.bfloat16]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def int4_weight(n, k, seed=0):
    codes = torch.randint(0, 16, (n, k), generator=gen(seed), dtype=torch.uint8)
    return codes, _ref.pack(codes, 4, 1, torch.int32)


def sparse_weight(n, k, seed=0, dtype=torch.float16):
    """Random 2:4-sparse [n, k] with groups of 0, 1 and 2 nonzeros."""
    g = gen(seed)
    w = torch.randn(n, k, generator=g)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1) < torch.randint(0, 3, (n, k // 4, 1), generator=g)
    return (w * keep.reshape(n, k)).to(dtype)


# ---------------------------------------------------------------------------------------------
# w4a16_repack


def ptx_b_fragment_codes(codes: torch.Tensor, tiled: torch.Tensor):
    """Simulate the kernel's decode of every tiled word, and the codes the PTX B fragment demands.

    The kernel turns word j of lane `lane` (row kt) into four half2 registers: pair pa takes nibble pa (low
    half) and nibble pa + 4 (high half), and is B register (pa & 1) of n8 block 2j + (pa >> 1). PTX
    (mma.m16n8k16, floating point B): register r of lane 4g + t holds (k = 2t + 8r, n = g) in its low half
    and (k = 2t + 8r + 1, n = g) in its high half. Returns (decoded, wanted), both [K/16, N/64, 32, 4, 4, 2].
    """
    n_out, k_in = codes.shape
    words = tiled.to(torch.int64) & 0xFFFFFFFF
    decoded = torch.empty(k_in // 16, n_out // 64, 32, 4, 4, 2, dtype=torch.int64)
    wanted = torch.empty_like(decoded)
    for kt in range(k_in // 16):
        for b in range(n_out // 64):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for j in range(4):
                    w = int(words[kt, 128 * b + 4 * lane + j])
                    for pa in range(4):
                        decoded[kt, b, lane, j, pa, 0] = (w >> (4 * pa)) & 0xF
                        decoded[kt, b, lane, j, pa, 1] = (w >> (4 * pa + 16)) & 0xF
                        r, nb = pa & 1, 2 * j + (pa >> 1)
                        n = 64 * b + 8 * nb + g
                        for e in range(2):
                            wanted[kt, b, lane, j, pa, e] = int(codes[n, 16 * kt + 2 * t + 8 * r + e])
    return decoded, wanted


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k", [(64, 16), (128, 64), (192, 48)])
def test_w4a16_repack_matches_ptx_fragments(device, n, k):
    codes, qweight = int4_weight(n, k, seed=n + k)
    tiled = run_native("w4a16_repack", lambda: calibra.ops.w4a16_repack(qweight.to(device)), device).cpu()
    assert tiled.dtype == torch.int32 and tiled.shape == (k // 16, 2 * n)
    assert torch.equal(tiled, R.w4a16_repack(qweight))
    decoded, wanted = ptx_b_fragment_codes(codes, tiled)
    assert torch.equal(decoded, wanted)
    assert torch.equal(R.w4a16_unrepack(tiled), codes)


@pytest.mark.parametrize("device", DEVICES)
def test_w4a16_repack_strided_and_large(device):
    codes, qweight = int4_weight(4096 // 8, 256, seed=3)
    wide = torch.zeros(qweight.shape[0], qweight.shape[1] * 2, dtype=torch.int32)
    wide[:, ::2] = qweight
    q = wide[:, ::2].to(device)
    assert not q.is_contiguous()
    tiled = run_native("w4a16_repack", lambda: calibra.ops.w4a16_repack(q), device).cpu()
    assert torch.equal(tiled, R.w4a16_repack(qweight))
    assert torch.equal(R.w4a16_unrepack(tiled), codes)


def test_w4a16_repack_one_hand_computed_word():
    # lane 5 = (g 1, t 1), j = 2, kt = 0: nibble i = a + 4c holds code(n = 16*2 + 1 + 8*(a>>1), k = 2 + c + 8*(a&1))
    n, k = 64, 16
    codes = torch.zeros(n, k, dtype=torch.uint8)
    expect = 0
    for i in range(8):
        a, c = i % 4, i // 4
        codes[33 + 8 * (a >> 1), 2 + c + 8 * (a & 1)] = i + 1
        expect |= (i + 1) << (4 * i)
    tiled = calibra.ops.w4a16_repack(_ref.pack(codes, 4, 1, torch.int32))
    assert int(tiled[0, 4 * 5 + 2]) & 0xFFFFFFFF == expect
    assert int((tiled != 0).sum()) == 1


# ---------------------------------------------------------------------------------------------
# w4a16_gemm


def quantized_operands(n, k, group, sym, dtype, seed=0):
    w = (torch.randn(n, k, generator=gen(seed)) * 0.05).to(dtype)
    q = calibra.ops.quantize(w, bits=4, group_size=group, symmetric=sym)
    qweight = calibra.ops.pack(q.codes, 4)
    tiled, scales, zeros = G.w4a16_prepare(qweight, q.scales, q.zeros, dtype=dtype, symmetric=sym)
    return q, tiled, scales, zeros


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", ACT)
def test_w4a16_reference_equals_calibra_dequantize(group, sym, dtype):
    q, tiled, scales, zeros = quantized_operands(128, 256, group, sym, dtype, seed=1)
    assert (zeros is None) == sym
    w_ref = R.w4a16_dequantize(tiled, scales, zeros, group)
    assert torch.equal(w_ref, calibra.ops.dequantize(q))  # bit-identical weights
    x = torch.randn(5, 256, generator=gen(2)).to(dtype)
    y = R.w4a16_gemm(x, tiled, scales, zeros, group)
    assert torch.equal(y, (x.float() @ w_ref.float().T).to(dtype))


def gemm_budget(x, w, ours, what):
    """The 2x rule against torch's own low-precision matmul (exact = fp64)."""
    exact = x.double().cpu() @ w.double().cpu().T
    lowp = (x.float().cpu() @ w.float().cpu().T).to(x.dtype)
    atol = 1e-3 * float(exact.abs().max())
    assert_close_2x(ours.reshape(exact.shape), exact, lowp, atol=atol, what=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 7, 16, 33, 128])
@pytest.mark.parametrize("group,sym", [(128, True), (32, False), (-1, False), (16, True)])
@pytest.mark.parametrize("dtype", ACT)
def test_w4a16_gemm_equals_reference(device, m, group, sym, dtype):
    n, k = (192, 256) if device == "cpu" else (576, 1024)  # CUDA: N tail (576 = 2 x 256 + 64), several K tiles
    q, tiled, scales, zeros = quantized_operands(n, k, group, sym, dtype, seed=m)
    x = torch.randn(m, k, generator=gen(m + 1)).to(dtype)
    args = [t.to(device) if t is not None else None for t in (x, tiled, scales, zeros)]
    y = run_native("w4a16_gemm", lambda: calibra.ops.w4a16_gemm(*args, group), device)
    assert y.shape == (m, n) and y.dtype == dtype
    gemm_budget(x, calibra.ops.dequantize(q), y.cpu(), f"w4a16 m={m} g={group} sym={sym}")


@pytest.mark.parametrize("device", DEVICES)
def test_w4a16_gemm_leading_dims_and_empty(device):
    q, tiled, scales, zeros = quantized_operands(64, 128, 64, False, torch.float16)
    x = torch.randn(2, 3, 128, generator=gen(5)).half()
    ops = [t.to(device) for t in (tiled, scales, zeros)]
    y = run_native("w4a16_gemm", lambda: calibra.ops.w4a16_gemm(x.to(device), *ops, 64), device)
    assert y.shape == (2, 3, 64)
    gemm_budget(x.reshape(6, 128), calibra.ops.dequantize(q), y.cpu().reshape(6, 64), "leading dims")
    empty = calibra.ops.w4a16_gemm(torch.empty(0, 128, dtype=torch.float16, device=device), *ops, 64)
    assert empty.shape == (0, 64)


@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cuda"])
def test_w4a16_gemm_split_k_matches_unsplit(device):
    # batch 1 on a small N leaves most SMs idle: the op splits K (workspace from Python); the result must
    # agree with the reference as tightly as an unsplit run.
    n, k = 256, 4096
    assert G.split_k(1, n, k, 132, G.W4A16_N_TILE, 16) > 1
    q, tiled, scales, zeros = quantized_operands(n, k, 128, True, torch.float16, seed=9)
    x = torch.randn(1, k, generator=gen(10)).half()
    y = run_native(
        "w4a16_gemm", lambda: calibra.ops.w4a16_gemm(x.cuda(), tiled.cuda(), scales.cuda(), None, 128), "cuda"
    )
    gemm_budget(x, calibra.ops.dequantize(q), y.cpu(), "split-K")


def test_tile_constants_mirror_the_kernels():
    """The Python mirror of params/gemm.h's block widths, which the CUDA kernels static_assert."""
    from calibra import _native

    cpu = _native.load("cpu")
    assert (G.W4A16_N_TILE, G.W4A16_M_TILE_MIN) == (cpu.W4A16_N_TILE, cpu.W4A16_M_TILE_MIN)
    assert (G.SPARSE24_N_TILE, G.SPARSE24_M_TILE_MIN) == (cpu.SPARSE24_N_TILE, cpu.SPARSE24_M_TILE_MIN)


def test_split_k_heuristic():
    assert G.split_k(128, 57344, 8192, 132, G.W4A16_N_TILE, 16) == 1  # enough tiles already
    s = G.split_k(1, 4096, 4096, 132, G.W4A16_N_TILE, 16)
    assert 1 < s <= 16
    k_tiles = 4096 // 64
    per = -(-k_tiles // s)
    assert (s - 1) * per < k_tiles  # no empty slice
    assert G.split_k(1, 4096, 256, 132, G.W4A16_N_TILE, 16) == 1  # too short to split (4 K tiles)


@pytest.mark.parametrize(
    "args,err,match",
    [
        (
            lambda: (
                torch.randn(2, 100).half(),
                torch.zeros(6, 128, dtype=torch.int32),
                torch.ones(1, 64).half(),
                None,
                -1,
            ),
            ValueError,
            r"\[w4a16_gemm\] in_features \(100\) must be a multiple of 64",
        ),
        (
            lambda: (torch.randn(2, 128), torch.zeros(8, 128, dtype=torch.int32), torch.ones(1, 64), None, -1),
            TypeError,
            r"\[w4a16_gemm\] x must be one of",
        ),
        (
            lambda: (
                torch.randn(2, 128).half(),
                torch.zeros(8, 96, dtype=torch.int32),
                torch.ones(1, 48).half(),
                None,
                -1,
            ),
            ValueError,
            r"\[w4a16_gemm\] tiled \(8, 96\) does not fit",
        ),
        (
            lambda: (
                torch.randn(2, 128).half(),
                torch.zeros(8, 128, dtype=torch.int32),
                torch.ones(3, 64).half(),
                None,
                48,
            ),
            ValueError,
            r"\[w4a16_gemm\] group_size must be",
        ),
        (
            lambda: (
                torch.randn(2, 128).half(),
                torch.zeros(8, 128, dtype=torch.int32),
                torch.ones(2, 64).half(),
                None,
                32,
            ),
            ValueError,
            r"\[w4a16_gemm\] scales must be \[groups, out_features\] = \[4, 64\]",
        ),
        (
            lambda: (
                torch.randn(2, 128).half(),
                torch.zeros(8, 128, dtype=torch.int32),
                torch.ones(1, 64).bfloat16(),
                None,
                -1,
            ),
            TypeError,
            r"\[w4a16_gemm\] scales must have x's dtype",
        ),
    ],
)
def test_w4a16_gemm_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        calibra.ops.w4a16_gemm(*args())


def test_w4a16_repack_bad_input():
    with pytest.raises(ValueError, match=r"\[w4a16_repack\] out_features \(32\) must be a multiple of 64"):
        calibra.ops.w4a16_repack(torch.zeros(32, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[w4a16_repack\] in_features \(24\) must be a multiple of 16"):
        calibra.ops.w4a16_repack(torch.zeros(64, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"\[w4a16_repack\] qweight must be"):
        calibra.ops.w4a16_repack(torch.zeros(64, 2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# sparse24_reorder_meta


def ptx_metadata_dense(values: torch.Tensor, meta_r: torch.Tensor) -> torch.Tensor:
    """Rebuild the dense matrix the way mma.sp.m16n8k32 (f16/bf16, selector 0) reads its operands.

    PTX: A register r of lane 4g + t holds the two kept values of 4-wide chunk t (r = 0, 1) or t + 4
    (r = 2, 3) of row g (r even) or g + 8 (r odd); kept values are in ascending index order, so chunk c of
    a 16x32 tile is compressed columns 2c, 2c+1. Metadata: lane 4g + h (h = 0, 1) covers columns
    16h..16h+15 of the tile, row g in bits 0..15 and row g + 8 in bits 16..31, chunk c % 4 at bits
    4(c%4)..4(c%4)+3 of that half (low 2 bits: index of the first kept value).
    """
    n_out, half_k = values.shape
    dense = torch.zeros(n_out, 2 * half_k, dtype=values.dtype)
    words = meta_r.to(torch.int64) & 0xFFFFFFFF
    for rt in range(n_out // 16):
        for kq in range(half_k // 16):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for r in range(4):
                    row = 16 * rt + g + 8 * (r & 1)
                    chunk = t + 4 * (r >> 1)
                    h = chunk // 4
                    e = int(words[rt, 16 * kq + 2 * g + h])
                    half = (e >> (16 * (r & 1))) & 0xFFFF
                    nib = (half >> (4 * (chunk % 4))) & 0xF
                    for v, idx in enumerate((nib & 3, nib >> 2)):
                        dense[row, 32 * kq + 4 * chunk + idx] = values[row, 16 * kq + 2 * chunk + v]
    return dense


@pytest.mark.parametrize("device", NO_METAL_SPARSE24)
@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (32, 128)])
def test_sparse24_reorder_meta_matches_ptx_metadata(device, n, k):
    w = sparse_weight(n, k, seed=n * k)
    values, meta = calibra.ops.compress_24(w)
    meta_r = run_native(
        "sparse24_reorder_meta", lambda: calibra.ops.sparse24_reorder_meta(meta.to(device)), device
    ).cpu()
    assert meta_r.dtype == torch.int32 and meta_r.shape == (n // 16, k // 2)
    assert torch.equal(meta_r, R.sparse24_reorder_meta(meta))
    assert torch.equal(R.sparse24_unreorder_meta(meta_r), meta)
    assert torch.equal(ptx_metadata_dense(values, meta_r), w)


@pytest.mark.parametrize("device", NO_METAL_SPARSE24)
def test_sparse24_reorder_meta_strided(device):
    meta = calibra.ops.compress_24(sparse_weight(64, 256, seed=4))[1]
    wide = torch.zeros(64, 32, dtype=torch.int16)
    wide[:, ::2] = meta
    m = wide[:, ::2].to(device)
    out = run_native("sparse24_reorder_meta", lambda: calibra.ops.sparse24_reorder_meta(m), device).cpu()
    assert torch.equal(out, R.sparse24_reorder_meta(meta))


def test_sparse24_reorder_meta_hand_computed():
    meta = torch.zeros(16, 2, dtype=torch.int16)
    meta[3, 1] = 0x1234
    meta[11, 1] = -0x1000  # 0xF000
    out = calibra.ops.sparse24_reorder_meta(meta)
    # row 3 = g 3 (low half), row 11 = g 3 + 8 (high half), column word 1 = h 1 -> word 2*3 + 1
    assert int(out[0, 7]) & 0xFFFFFFFF == 0xF0001234
    assert int((out != 0).sum()) == 1


def test_sparse24_reorder_meta_bad_input():
    with pytest.raises(ValueError, match=r"\[sparse24_reorder_meta\] rows \(8\) must be a multiple of 16"):
        calibra.ops.sparse24_reorder_meta(torch.zeros(8, 2, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"\[sparse24_reorder_meta\] columns \(48\) must be a multiple of 32"):
        calibra.ops.sparse24_reorder_meta(torch.zeros(16, 3, dtype=torch.int16))


# ---------------------------------------------------------------------------------------------
# sparse24_gemm


@pytest.mark.parametrize("device", NO_METAL_SPARSE24)
@pytest.mark.parametrize("m", [1, 5, 8, 17, 64, 128])
@pytest.mark.parametrize("dtype", ACT)
def test_sparse24_gemm_equals_reference(device, m, dtype):
    n, k = (48, 128) if device == "cpu" else (400, 1024)  # CUDA: N tail (400 = 3 x 128 + 16), several K tiles
    w = sparse_weight(n, k, seed=m, dtype=dtype)
    values, meta_r = G.sparse24_prepare(w)
    x = torch.randn(m, k, generator=gen(m + 7)).to(dtype)
    y = run_native(
        "sparse24_gemm", lambda: calibra.ops.sparse24_gemm(x.to(device), values.to(device), meta_r.to(device)), device
    )
    assert y.shape == (m, n) and y.dtype == dtype
    assert torch.equal(R.sparse24_gemm(x, values, meta_r), (x.float() @ w.float().T).to(dtype))
    gemm_budget(x, w, y.cpu(), f"sparse24 m={m}")


@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cuda"])
def test_sparse24_gemm_split_k(device):
    n, k = 128, 4096
    assert G.split_k(1, n, k, 132, G.SPARSE24_N_TILE, 8) > 1
    w = sparse_weight(n, k, seed=11)
    values, meta_r = G.sparse24_prepare(w)
    x = torch.randn(1, k, generator=gen(12)).half()
    y = run_native("sparse24_gemm", lambda: calibra.ops.sparse24_gemm(x.cuda(), values.cuda(), meta_r.cuda()), "cuda")
    gemm_budget(x, w, y.cpu(), "sparse split-K")


def test_sparse24_gemm_bad_input():
    x = torch.randn(2, 128).half()
    values, meta_r = G.sparse24_prepare(sparse_weight(32, 128))
    with pytest.raises(TypeError, match=r"\[sparse24_gemm\] values must have x's dtype"):
        calibra.ops.sparse24_gemm(x, values.bfloat16(), meta_r)
    with pytest.raises(ValueError, match=r"\[sparse24_gemm\] meta must be \[N/16, in_features/2\]"):
        calibra.ops.sparse24_gemm(x, values, meta_r[:1])
    with pytest.raises(ValueError, match=r"\[sparse24_gemm\] in_features \(96\) must be a multiple of 64"):
        calibra.ops.sparse24_gemm(torch.randn(2, 96).half(), values[:, :48], meta_r[:, :48])


# ---------------------------------------------------------------------------------------------
# registry


def test_opcheck():
    _, tiled, scales, zeros = quantized_operands(64, 128, 32, False, torch.float16)
    x = torch.randn(3, 128).half()
    torch.library.opcheck(torch.ops.calibra.w4a16_gemm.default, (x, tiled, scales, zeros, 32))
    torch.library.opcheck(torch.ops.calibra.w4a16_gemm.default, (x, tiled, scales, None, 32))
    torch.library.opcheck(torch.ops.calibra.w4a16_repack.default, (int4_weight(64, 32)[1],))
    w = sparse_weight(32, 64)
    values, meta = calibra.ops.compress_24(w)
    torch.library.opcheck(torch.ops.calibra.sparse24_reorder_meta.default, (meta,))
    torch.library.opcheck(
        torch.ops.calibra.sparse24_gemm.default,
        (torch.randn(2, 64).half(), values, calibra.ops.sparse24_reorder_meta(meta)),
    )


def test_workspace_only_on_cuda():
    x = torch.randn(1, 4096).half()
    assert G._gemm_workspace("cpu", x, torch.zeros(256, 512, dtype=torch.int32)) == []
    assert G._sp_workspace("cpu", x, torch.zeros(128, 2048).half(), None) == []
