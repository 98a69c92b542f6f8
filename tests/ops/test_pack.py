"""calibra::pack / calibra::unpack against the reference, against hand-computed words, and against the
export layouts they serve (GPTQ, compressed-tensors, FP4, MLX)."""

import pytest
import torch

import calibra
from calibra.ops import _ref
from tests.ops.harness import DEVICES, noncontiguous, run_native

WORDS = [torch.int32, torch.uint8]


def stream_words(line, bits, wb):
    """Independent oracle: the line as one Python big integer, cut into wb-bit words (unsigned)."""
    s = 0
    for i, v in enumerate(line):
        s |= int(v) << (i * bits)
    nw = -(-len(line) * bits // wb)
    return [(s >> (wb * k)) & ((1 << wb) - 1) for k in range(nw)]


def as_unsigned(t: torch.Tensor) -> list:
    wb = 32 if t.dtype == torch.int32 else 8
    return [int(v) & ((1 << wb) - 1) for v in t.tolist()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 3, 33, 100])
def test_equals_reference_and_round_trips(device, bits, cols):
    torch.manual_seed(bits * 1000 + cols)
    x = torch.randint(0, 2**bits, (7, cols), dtype=torch.uint8, device=device)
    for inp in (x, x.t(), noncontiguous(x)):
        for dim in (0, 1, -1):
            for word in WORDS:
                ours = run_native("pack", lambda: calibra.ops.pack(inp, bits, dim=dim, word=word), device)
                ref = _ref.pack(inp.cpu(), bits, dim, word)
                assert ours.dtype == word and ours.is_contiguous()
                assert torch.equal(ours.cpu(), ref), (tuple(inp.shape), inp.stride(), dim, word)
                length = inp.shape[dim]
                back = run_native("unpack", lambda: calibra.ops.unpack(ours, bits, length=length, dim=dim), device)
                assert torch.equal(back.cpu(), inp.cpu())
                assert torch.equal(back.cpu(), _ref.unpack(ref, bits, dim, length))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [3, 4, 5, 8])
def test_unpack_strided_words(device, bits):
    x = torch.randint(0, 2**bits, (9, 40), dtype=torch.uint8, device=device)
    for dim in (0, 1):
        words = calibra.ops.pack(x, bits, dim=dim)
        for w in (noncontiguous(words), words.t().contiguous().t()):
            back = run_native("unpack", lambda: calibra.ops.unpack(w, bits, length=x.shape[dim], dim=dim), device)
            assert torch.equal(back, x)


@pytest.mark.parametrize("device", DEVICES)
def test_hand_written_words(device):
    codes = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8, device=device)
    # 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 = 0x58d1
    assert calibra.ops.pack(codes, 3).tolist() == [[0x58D1]]
    assert calibra.ops.pack(codes, 3, word=torch.uint8).tolist() == [[0xD1, 0x58]]
    assert calibra.ops.pack(codes.t(), 3, dim=0).tolist() == [[0x58D1]]
    # 8 bits: one code per byte, little-endian words
    assert calibra.ops.pack(codes, 8).tolist() == [[0x04030201, 0x05]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_against_big_integer_oracle(device, bits):
    torch.manual_seed(bits)
    x = torch.randint(0, 2**bits, (3, 45), dtype=torch.uint8, device=device)
    for word, wb in ((torch.int32, 32), (torch.uint8, 8)):
        packed = calibra.ops.pack(x, bits, word=word).cpu()
        for r in range(3):
            assert as_unsigned(packed[r]) == stream_words(x[r].tolist(), bits, wb)


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_layouts(device):
    # v1 symmetric 4-bit: zero 8 stored as zero - 1 = 7 -> every qzeros word is 0x77777777
    zeros = torch.full((4, 64), 7, dtype=torch.uint8, device=device)
    qzeros = run_native("pack", lambda: calibra.ops.pack(zeros, 4), device)
    assert qzeros.shape == (4, 8) and (qzeros == 0x77777777).all()
    # qweight = pack(codes.T, bits, dim=0) of [out, in] codes: word r of column o holds in = r*8 + j at bits 4j
    w = torch.randint(0, 16, (5, 64), dtype=torch.uint8, device=device)  # [out, in]
    qweight = calibra.ops.pack(w.t(), 4, dim=0).cpu()
    assert qweight.shape == (8, 5)
    for o in range(5):
        for r in range(8):
            word = int(qweight[r, o]) & 0xFFFFFFFF
            assert [(word >> (4 * j)) & 15 for j in range(8)] == w[o, 8 * r : 8 * r + 8].tolist()
    # 3-bit: 32 rows into 3 words; code 10 straddles words 0 and 1 (bits 30-31 | bit 0), code 21 words 1 and 2
    col = torch.zeros(32, 1, dtype=torch.uint8, device=device)
    col[10, 0] = 0b111
    col[21, 0] = 0b101
    q3 = calibra.ops.pack(col, 3, dim=0).cpu()
    assert q3.shape == (3, 1)
    words = [int(v) & 0xFFFFFFFF for v in q3[:, 0]]
    assert words == [
        0b11 << 30,
        0b1 | (0b1 << 31),
        0b10,
    ]  # code 21 at bits 63..65: bit 31 of word 1, bits 0-1 of word 2 = 0b10


@pytest.mark.parametrize("device", DEVICES)
def test_fp4_and_mlx_layouts(device):
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8, device=device)
    fp4 = calibra.ops.pack(codes, 4, word=torch.uint8)
    assert fp4.tolist() == [[0x21, 0x43, 0x0F]]  # even index in the low nibble
    x = torch.randint(0, 16, (3, 64), dtype=torch.uint8, device=device)
    mlx = calibra.ops.pack(x, 4).cpu().view(torch.uint32)
    for j in range(64):
        assert ((mlx[:, j // 8].to(torch.int64) >> (4 * (j % 8))) & 15).tolist() == x[:, j].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_code_too_large(device):
    x = torch.zeros(4, 10, dtype=torch.uint8, device=device)
    x[2, 7] = 9
    x[3, 1] = 200
    for dim in (0, 1):
        with pytest.raises(ValueError, match=r"\[pack\] codes must be < 2\*\*bits \(found 9 at row 2, col 7\)"):
            run_native("pack", lambda: calibra.ops.pack(x, 3, dim=dim), device)
        with pytest.raises(ValueError, match=r"\[pack\] codes must be < 2\*\*bits \(found 9 at row 2, col 7\)"):
            _ref.pack(x.cpu(), 3, dim, torch.int32)
    with pytest.raises(ValueError, match=r"found 200 at row 3, col 1"):
        run_native("pack", lambda: calibra.ops.pack(x, 7, dim=0), device)
    calibra.ops.pack(x, 8)  # 200 fits in 8 bits


def test_code_too_large_position_on_transposed_view():
    x = torch.zeros(4, 10, dtype=torch.uint8)
    x[3, 1] = 200
    with pytest.raises(ValueError, match=r"found 200 at row 1, col 3"):
        calibra.ops.pack(x.t(), 7)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    x = torch.zeros(0, 5, dtype=torch.uint8, device=device)
    assert calibra.ops.pack(x, 4).shape == (0, 1)
    assert calibra.ops.pack(x, 4, dim=0).shape == (0, 5)
    assert calibra.ops.unpack(torch.zeros(0, 5, dtype=torch.int32, device=device), 4, length=0, dim=0).shape == (0, 5)


def test_opcheck():
    x = torch.randint(0, 8, (6, 21), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.calibra.pack.default, (x, 3, 1, torch.int32))
    torch.library.opcheck(torch.ops.calibra.pack.default, (x.t(), 3, 0, torch.uint8))
    words = calibra.ops.pack(x, 3, dim=0)
    torch.library.opcheck(torch.ops.calibra.unpack.default, (words, 3, 0, 6))
    torch.library.opcheck(torch.ops.calibra.unpack.default, (calibra.ops.pack(x, 3), 3, 1, 21))


@pytest.mark.parametrize(
    "fn,err,match",
    [
        (lambda: calibra.ops.pack(torch.zeros(3, dtype=torch.uint8), 4), ValueError, r"\[pack\] codes must be 2-D"),
        (
            lambda: calibra.ops.pack(torch.zeros(3, 4, dtype=torch.int32), 4),
            TypeError,
            r"\[pack\] codes must be one of uint8",
        ),
        (
            lambda: calibra.ops.pack(torch.zeros(3, 4, dtype=torch.uint8), 9),
            ValueError,
            r"\[pack\] bits must be in \[1, 8\]",
        ),
        (
            lambda: calibra.ops.pack(torch.zeros(3, 4, dtype=torch.uint8), 0),
            ValueError,
            r"\[pack\] bits must be in \[1, 8\]",
        ),
        (
            lambda: calibra.ops.pack(torch.zeros(3, 4, dtype=torch.uint8), 4, dim=2),
            ValueError,
            r"\[pack\] dim must be 0, 1 or -1",
        ),
        (
            lambda: calibra.ops.pack(torch.zeros(3, 4, dtype=torch.uint8), 4, word=torch.int16),
            TypeError,
            r"\[pack\] word must be",
        ),
        (
            lambda: calibra.ops.unpack(torch.zeros(3, 2, dtype=torch.int32), 4, length=17),
            ValueError,
            r"\[unpack\] words has 2 words along dim 1, but length 17 at 4 bits needs ceil\(17\*4/32\) = 3",
        ),
        (
            lambda: calibra.ops.unpack(torch.zeros(3, 2, dtype=torch.int64), 4, length=16),
            TypeError,
            r"\[unpack\] words must be one of",
        ),
        (
            lambda: calibra.ops.unpack(torch.zeros(3, 2, dtype=torch.int32), 4, length=-1),
            ValueError,
            r"\[unpack\] length must be >= 0",
        ),
    ],
)
def test_bad_input(fn, err, match):
    with pytest.raises(err, match=match):
        fn()
