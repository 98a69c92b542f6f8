"""The Metal kernels (metal/*.metal), run on the CPU by the harness (metal/harness), against the
references of calibra.ops._ref.

The launches come from calibra._metal.Backend -- the host code the MPS backend uses on a Mac -- with
CPU tensors and the harness as executor, so buffer order, argument structs and grid sizes are tested
too. Integer outputs must be identical; so must every float output whose kernel performs the
reference's exact operation sequence (Hadamard, dequantize); accumulations (Hessian, W4A16) are
compared within a stated relative tolerance. What this cannot show: that Apple's compiler accepts the
source, or how fast it runs (see the README section "Metal backend").
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from calibra import _metal
from calibra.ops import _ref
from tests.metal.checks import assert_same, gen
from tests.metal.harness_exec import ROOT, HarnessExecutor

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# hadamard


@pytest.mark.parametrize(
    "shape,block,dtype",
    [
        ((3, 64), -1, torch.float32),
        ((5, 96), 32, torch.float32),
        ((2, 3, 256), -1, torch.float16),
        ((7, 40), 8, torch.bfloat16),
        ((3, 6), 2, torch.float32),
        ((1, 4096), -1, torch.float32),
    ],
)
def test_hadamard(metal, shape, block, dtype):
    x = torch.randn(shape, generator=gen(1)).to(dtype)
    out = torch.empty_like(x)
    assert metal.hadamard(x, block, out) is None
    assert_same(out, _ref.hadamard(x, block))


def test_hadamard_unsupported_cases_fall_back(metal):
    assert metal.hadamard(torch.zeros(1, 8192), -1, torch.empty(1, 8192)) is _metal.UNSUPPORTED
    assert (
        metal.hadamard(torch.zeros(2, 8, dtype=torch.float64), -1, torch.empty(2, 8, dtype=torch.float64))
        is _metal.UNSUPPORTED
    )


# ---------------------------------------------------------------------------------------------
# quantize


def _weight(shape, dtype, seed):
    w = torch.randn(shape, generator=gen(seed)) * torch.logspace(-3, 1, shape[1])
    w[0, : min(shape[1], 32)] = 0  # an all-zero group: scale 0 -> 1
    return w.to(dtype)


@pytest.mark.parametrize(
    "shape,bits,gs,sym,dtype",
    [
        ((7, 96), 4, 32, True, torch.float32),
        ((7, 96), 4, 32, False, torch.float32),
        ((5, 100), 3, -1, False, torch.float16),
        ((9, 64), 2, 16, True, torch.bfloat16),
        ((3, 384), 8, 128, False, torch.bfloat16),
        ((4, 160), 5, 160, True, torch.float16),
    ],
)
def test_quantize_dequantize_int(metal, shape, bits, gs, sym, dtype):
    w = _weight(shape, dtype, 2)
    want = _ref.quantize_int(w, bits, gs, sym)
    outs = [torch.empty_like(t) for t in want]
    metal.quantize_int(w, bits, gs, sym, *outs)
    for g, r in zip(outs, want):
        assert_same(g, r)
    codes, scales, zeros = want
    for out_dtype in (dtype, torch.float32):
        out = torch.empty(shape, dtype=out_dtype)
        metal.dequantize_int(codes, scales, zeros, gs, out_dtype, out)
        assert_same(out, _ref.dequantize_int(codes, scales, zeros, gs, out_dtype))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_dequantize_fp4(metal, fmt, dtype):
    w = _weight((5, 96), dtype, 3)
    w[2, 40] = 1e-30 if dtype == torch.float32 else w[2, 40]  # a tiny value next to large ones
    want = _ref.quantize_fp4(w, fmt)
    codes = torch.empty_like(want[0])
    scales = torch.empty_like(want[1])
    gscale = torch.empty(1)
    metal.quantize_fp4(w, fmt, codes, scales, gscale)
    assert_same(codes, want[0])
    assert_same(scales.view(torch.uint8), want[1].view(torch.uint8))
    assert_same(gscale, want[2])
    out = torch.empty(w.shape, dtype=dtype)
    metal.dequantize_fp4(*want, fmt, dtype, out)
    assert_same(out, _ref.dequantize_fp4(*want, fmt, dtype))


def test_nvfp4_amax_over_many_partials(metal):
    # > 1024 elements per partial and more than one threadgroup of partials: the two-pass reduction
    w = torch.randn(33, 2048, generator=gen(4))
    w[31, 2000] = 77.0
    gscale = torch.empty(1)
    metal.quantize_fp4(
        w, "nvfp4", torch.empty(33, 2048, dtype=torch.uint8), torch.empty(33, 128, dtype=torch.float8_e4m3fn), gscale
    )
    assert_same(gscale, _ref.quantize_fp4(w, "nvfp4")[2])


# ---------------------------------------------------------------------------------------------
# pack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("word", [torch.int32, torch.uint8])
def test_pack_unpack(metal, bits, dim, word):
    codes = torch.randint(0, 2**bits, (7, 37), dtype=torch.uint8, generator=gen(bits))
    want = _ref.pack(codes, bits, dim, word)
    out = torch.empty_like(want)
    metal.pack(codes, bits, dim, word, out)
    assert_same(out, want)
    length = codes.shape[dim]
    back = torch.empty_like(codes)
    metal.unpack(want, bits, dim, length, back)
    assert_same(back, codes)


# ---------------------------------------------------------------------------------------------
# sparsity


@pytest.mark.parametrize(
    "shape,n,m,dtype",
    [
        ((3, 5, 24), 2, 4, torch.float32),
        ((7, 24), 3, 8, torch.float16),
        ((2, 96), 5, 32, torch.bfloat16),
    ],
)
def test_nm_mask(metal, shape, n, m, dtype):
    s = torch.randint(-3, 4, shape, generator=gen(5)).to(dtype)  # many ties
    s.view(-1)[::7] = -0.0
    out = torch.empty(shape, dtype=torch.bool)
    metal.nm_mask(s, n, m, out)
    assert_same(out, _ref.nm_mask(s, n, m))


@pytest.mark.parametrize("dtype", FLOATS)
def test_compress_decompress_24(metal, dtype):
    w = torch.randn(5, 48, generator=gen(6))
    keep = torch.rand(5, 12, 4, generator=gen(7)).argsort(-1)[..., :2]
    mask = torch.zeros(5, 12, 4, dtype=torch.bool).scatter_(-1, keep, True)
    w = (w.view(5, 12, 4) * mask).view(5, 48)
    w[1, 4:8] = 0  # a group with no nonzero
    w[2, 8] = -0.0
    w[3, 12:16] = torch.tensor([0.0, 0.0, 0.0, 2.5])  # one nonzero
    w = w.to(dtype)
    values, meta = _ref.compress_24(w)
    gv, gm = torch.empty_like(values), torch.empty_like(meta)
    metal.compress_24(w, gv, gm)
    assert_same(gv, values)
    assert_same(gm, meta)
    out = torch.empty_like(w)
    metal.decompress_24(values, meta, out)
    assert_same(out, _ref.decompress_24(values, meta))


# ---------------------------------------------------------------------------------------------
# hessian: fp32 accumulation vs the fp64 reference


@pytest.mark.parametrize(
    "n,d,dtype", [(37, 70, torch.float32), (5, 33, torch.float16), (50, 31, torch.bfloat16), (1, 1, torch.float32)]
)
def test_hessian(metal, n, d, dtype):
    x = torch.randn(n, d, generator=gen(8)).to(dtype)
    A = torch.randn(d, d, generator=gen(9))
    H0 = A @ A.T
    want = H0.clone()
    _ref.hessian_accumulate(want, x)
    # only the lower triangle is read: poison the upper one
    H = torch.tril(H0) + torch.triu(torch.full_like(H0, 1e30), 1)
    assert metal.hessian_accumulate(H, x) is None
    assert torch.equal(H, H.T)
    tol = 1e-5 * (want.abs().max() + 1)
    assert float((H - want).abs().max()) <= tol


def test_hessian_fp64_falls_back(metal):
    assert metal.hessian_accumulate(torch.zeros(4, 4, dtype=torch.float64), torch.ones(2, 4)) is _metal.UNSUPPORTED


# ---------------------------------------------------------------------------------------------
# the harness catches a missing barrier


def test_missing_barrier_is_caught(harness_lib):
    """cal_hadamard_nobarrier is cal_hadamard compiled with CALIBRA_TEST_DROP_BARRIER (the barrier
    between loading the block into threadgroup memory and the first butterfly removed). With a skewed
    thread start (high thread indices run first) the first butterflies read slots that their owners
    have not written yet: the output is wrong. The intact kernel under the same skew is exact."""
    skewed = HarnessExecutor(harness_lib, skew_us=300)
    x = torch.randn(4, 256, generator=gen(12))
    want = _ref.hadamard(x, -1)

    def run(kernel):
        out = torch.full_like(x, float("nan"))
        b = 256
        a = _metal.kargs(
            "HadamardArgs",
            "cpu",
            blocks=4,
            block=b,
            dtype=0,
            scale_bits=_metal._f32_bits(float(torch.tensor(1 / math.sqrt(b)))),
        )
        skewed.run(_metal.Launch(kernel, [x, out, a], (4, 1, 1), (64, 1, 1)))
        return out

    assert_same(run("cal_hadamard"), want)
    broken = run("cal_hadamard_nobarrier")
    wrong = ~torch.isclose(broken, want)
    assert int(wrong.sum()) > 0, "the harness did not expose the missing barrier"


# ---------------------------------------------------------------------------------------------
# the sources stay inside what the harness can execute, and agree with the host code

SOURCES = sorted((ROOT / "metal").glob("*.metal"))


def test_every_kernel_is_in_the_harness(executor):
    names = set()
    for f in SOURCES:
        names |= set(re.findall(r"kernel\s+void\s+(\w+)\s*\(", f.read_text()))
    assert len(names) == 17
    # +1: the barrier-less copy of cal_hadamard
    assert executor.lib.mh_kernel_count() == len(names) + 1


def test_sources_use_the_executable_subset():
    for f in SOURCES + [ROOT / "metal" / "calibra_common.h"]:
        text = re.sub(r"//.*", "", f.read_text())
        for bad in ("texture", "atomic", "simdgroup_matrix", "imageblock", "threadgroup_imageblock"):
            assert bad not in text, f"{f.name} uses {bad}, which the CPU harness does not execute"
        # threadgroup memory: arrays declared at kernel scope only (metal_compat.h maps the qualifier to
        # `static`, which is right for a declaration and wrong for a pointer or a parameter)
        for m in re.finditer(r"\bthreadgroup\b(?!_)[^;]*;", text):
            decl = m.group(0)
            assert re.fullmatch(r"threadgroup\s+\w+\s+\w+\[[\w\s*+/]+\];", decl), f"{f.name}: {decl!r}"


def test_kargs_field_order_matches_host():
    text = (ROOT / "metal" / "kargs.h").read_text()
    structs = dict(re.findall(r"struct (\w+) \{(.*?)\};", text, re.S))
    assert set(structs) == set(_metal.KARGS)
    for name, body in structs.items():
        fields = []
        for line in re.sub(r"//.*", "", body).split(";"):
            line = line.strip()
            if line:
                assert line.startswith("long "), f"{name}: only long fields, got {line!r}"
                fields += [f.strip() for f in line[5:].split(",")]
        assert tuple(fields) == _metal.KARGS[name], name


def test_library_source_is_self_contained():
    src = _metal.library_source()
    includes = re.findall(r"#include\s*(\S+)", src)
    assert set(includes) == {"<metal_stdlib>"}
    assert src.count("struct HadamardArgs") == 1
    assert len(re.findall(r"kernel\s+void\s+\w+", src)) == 17


def test_mps_data_checks_raise_the_reference_errors():
    from calibra.ops import _mps

    w = torch.zeros(2, 32)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"\[quantize\] w contains NaN/Inf \(first at row 1, col 3\)"):
        _mps.DATA_CHECKS["quantize_int"](w, 4, 32, True)
    with pytest.raises(ValueError, match=r"\[pack\] codes must be < 2\*\*bits"):
        _mps.DATA_CHECKS["pack"](torch.full((2, 3), 9, dtype=torch.uint8), 3, 1, torch.int32)
    with pytest.raises(ValueError, match=r"\[compress_24\] w is not 2:4 sparse"):
        _mps.DATA_CHECKS["compress_24"](torch.ones(1, 16))
    with pytest.raises(ValueError, match=r"\[nm_mask\]"):
        _mps.DATA_CHECKS["nm_mask"](torch.tensor([[1.0, float("nan")]]), 1, 2)
    with pytest.raises(ValueError, match=r"\[decompress_24\]"):
        _mps.DATA_CHECKS["decompress_24"](torch.zeros(1, 8), torch.zeros(1, 1, dtype=torch.int16))


# ---------------------------------------------------------------------------------------------
# which kernels serve which op (what `calibra selftest` lists)


def test_op_kernel_table_matches_sources_and_backend():
    from calibra.ops import OPS

    in_sources = set()
    for f in SOURCES:
        in_sources |= set(re.findall(r"kernel\s+void\s+(\w+)\s*\(", f.read_text()))
    listed = {k for ks in _metal.OP_KERNELS.values() for k in ks}
    assert listed == in_sources
    backend_ops = {n for n in OPS if hasattr(_metal.Backend, n)}
    assert set(_metal.OP_KERNELS) == backend_ops
    assert _metal.RUN_ON_APPLE_HARDWARE <= listed


def test_each_op_example_launches_only_its_kernels(metal, executor):
    from calibra.ops import OPS
    from calibra.ops._registry import _mps_call

    for name, kernels in _metal.OP_KERNELS.items():
        op = OPS[name]
        args = op.example("cpu")
        before = len(executor.kernels)
        _mps_call(op, getattr(metal, name), args, op.alloc(*args))
        launched = set(executor.kernels[before:])
        assert launched and launched <= set(kernels), (name, launched)


def test_selftest_lists_the_metal_kernels_as_never_run_on_apple_hardware(capsys):
    from calibra.selftest import run_selftest

    assert run_selftest("cpu", verbose=True)
    out = capsys.readouterr().out
    assert "Metal kernels" in out and "not runnable here" in out
    for name, kernels in _metal.OP_KERNELS.items():
        line = next(ln for ln in out.splitlines() if ln.split()[:2] == [name, "metal"])
        assert all(k in line for k in kernels) and "never run on Apple hardware" in line


def test_every_source_is_built_and_shipped():
    # the Mac build (metallib) and the wheel's sources list the files by hand: a new kernel file must be in both
    assert sorted(_metal.KERNEL_FILES) == sorted(f.name for f in SOURCES)
    stems = re.search(r"set\(_metal_kernels ([\w ]+)\)", (ROOT / "cmake" / "calibra_metal.cmake").read_text())
    assert sorted(stems.group(1).split()) == sorted(f.stem for f in SOURCES)
    install = re.search(
        r"install\(FILES (metal/[^)]*)DESTINATION calibra/metal\)", (ROOT / "CMakeLists.txt").read_text()
    )
    assert sorted(install.group(1).split()) == sorted(
        ["metal/kargs.h", "metal/calibra_common.h"] + [f"metal/{f.name}" for f in SOURCES]
    )
