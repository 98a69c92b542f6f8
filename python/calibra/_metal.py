"""The Metal backend's host side: how each calibra op is dispatched onto the kernels of ``metal/*.metal``.

Everything here is plain torch and is shared by two executors:

- on macOS, :class:`MpsExecutor` compiles the shipped Metal source with ``torch.mps.compile_shader``
  (torch >= 2.6) and launches the kernels on PyTorch's MPS stream;
- on any machine, the CPU harness of ``tests/metal`` (``metal/harness``) runs the very same kernel
  source compiled as C++, one std::thread per GPU thread, with the launches planned here.

So the planning code below (buffer order, argument structs, grid and threadgroup sizes, host-side data
checks) is exercised in CI even though no Mac runs it. :func:`load_backend` returns the object that
``calibra._native.load("mps")`` hands to the op registry: one method per op, taking torch tensors
(MPS tensors) and the op's preallocated outputs in schema order, like the other backends take
TensorArg tuples. A method returns :data:`UNSUPPORTED` for a case the kernels do not cover (float64,
a Hadamard block > 4096); the registry then runs the op's reference on the same device.

Kernels cannot raise, so data errors (NaN/Inf weights, codes >= 2**bits, NaN scores, a 2:4 group with
three nonzeros, bad metadata) are checked before dispatch by ``calibra/ops/_mps.py`` with the
references' own checks (this module stays below ops/ in the import order); that costs one extra
read of the input and a device sync per call.

Why the source and not the metallib at run time: torch offers no public API to load a prebuilt
``.metallib`` into its MPS stream, so the wheel's ``calibra/kernels.metallib`` (built on macOS by
``cmake/calibra_metal.cmake``) proves at build time that Apple's compiler accepts the kernels, and the
runtime compiles ``calibra/metal/*.metal`` once per process.
"""

from __future__ import annotations

import math
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

UNSUPPORTED = object()
KERNEL_FILES = (
    "hadamard.metal",
    "quantize.metal",
    "pack.metal",
    "sparsity.metal",
    "hessian.metal",
    "w4a16.metal",
    "gptq.metal",
)
HADAMARD_MAX = 4096  # CAL_HADAMARD_MAX: the block lives in 16 KiB of threadgroup memory
_FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # enum CalibraDType in kargs.h

# Field order of every argument struct in metal/kargs.h (tests/metal checks the two agree).
KARGS = {
    "HadamardArgs": ("blocks", "block", "dtype", "scale_bits"),
    "QuantizeIntArgs": ("rows", "cols", "group", "groups", "bits", "symmetric", "dtype"),
    "DequantizeIntArgs": ("rows", "cols", "group", "groups", "scale_dtype", "out_dtype"),
    "Fp4Args": ("rows", "cols", "group", "mx", "dtype", "partials"),
    "PackArgs": ("rows", "cols", "bits", "dim", "word_bits", "words"),
    "NmMaskArgs": ("rows", "k", "n", "m", "dtype"),
    "Sparse24Args": ("rows", "k", "dtype"),
    "HessianArgs": ("n", "d", "tiles", "dtype"),
    "W4A16Args": ("m", "n", "k", "group", "groups", "has_zeros", "dtype"),
    "GptqSweepArgs": (
        "rows",
        "cols",
        "groups",
        "nshrink",
        "nm_n",
        "nm_m",
        "has_mask",
        "bits",
        "symmetric",
        "format",
        "scale_dtype",
        "global_scale_bits",
    ),
}
SWEEP_FORMATS = {"int": 0, "mxfp4": 1, "nvfp4": 2, "none": 3}  # calibra::SweepFormat

# The kernels behind each op of the Metal backend (tests/metal checks this against the sources and against
# the launches the harness sees); `calibra selftest` lists them.
OP_KERNELS = {
    "hadamard": ("cal_hadamard",),
    "quantize_int": ("cal_quantize_int",),
    "dequantize_int": ("cal_dequantize_int",),
    "quantize_fp4": ("cal_fp4_amax_partial", "cal_fp4_amax_final", "cal_quantize_fp4"),
    "dequantize_fp4": ("cal_dequantize_fp4",),
    "pack": ("cal_pack",),
    "unpack": ("cal_unpack",),
    "nm_mask": ("cal_nm_mask",),
    "compress_24": ("cal_compress_24",),
    "decompress_24": ("cal_decompress_24",),
    "hessian_accumulate": ("cal_hessian",),
    "gptq_block_sweep": ("cal_gptq_sweep",),
    "sparsegpt_block_sweep": ("cal_gptq_sweep",),
    "w4a16_repack": ("cal_w4a16_repack",),
    "w4a16_gemm": ("cal_w4a16_gemv", "cal_w4a16_gemm"),
}
# Kernels whose results have been checked on Apple hardware (an MPS run of tests/ops). None yet: every
# kernel above is verified only by the CPU harness (tests/metal). Add a name here only with the run's record.
RUN_ON_APPLE_HARDWARE: frozenset[str] = frozenset()


def source_dir() -> Path:
    """The folder with the .metal sources: ``calibra/metal`` in a wheel, ``metal/`` in a source tree."""
    here = Path(__file__).resolve().parent
    for d in (here / "metal", here.parent.parent / "metal"):
        if (d / "kargs.h").is_file():
            return d
    raise FileNotFoundError("[metal] the Metal kernel sources are not installed (expected calibra/metal/*.metal)")


def library_source(files=KERNEL_FILES) -> str:
    """All kernels as one Metal source, with calibra's own headers inlined once each (compile_shader
    takes a single string and cannot resolve our includes)."""
    d = source_dir()
    seen: set[str] = set()

    def expand(text: str) -> str:
        out = []
        for line in text.splitlines():
            m = re.match(r'\s*#include\s+"([^"]+)"', line)
            if m:
                name = m.group(1)
                if name not in seen:
                    seen.add(name)
                    out.append(expand((d / name).read_text()))
                continue
            if line.strip() == "#pragma once":
                continue
            out.append(line)
        return "\n".join(out)

    return "\n".join(expand((d / f).read_text()) for f in files)


# ---------------------------------------------------------------------------------------------
# launches


@dataclass
class Launch:
    kernel: str
    buffers: list  # tensors bound to [[buffer(0..)]] in order; the args struct is one of them
    groups: tuple  # threadgroups per grid (x, y, z)
    threads: tuple  # threads per threadgroup (x, y, z)


def kargs(name: str, device, **values) -> torch.Tensor:
    """The argument struct ``name`` of metal/kargs.h as an int64 tensor on ``device``."""
    fields = KARGS[name]
    if set(values) != set(fields):
        raise KeyError(f"[metal] {name} takes {fields}, got {sorted(values)}")
    return torch.tensor([int(values[f]) for f in fields], dtype=torch.int64, device=device)


def _f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _blocks(n: int, per: int) -> int:
    return max(1, -(-n // per))


class Backend:
    """calibra's ops on Metal kernels, run by ``executor.run(launch)``."""

    def __init__(self, executor) -> None:
        self.executor = executor

    def _run(self, launches) -> None:
        for launch in launches:
            self.executor.run(launch)

    # ---- hadamard -------------------------------------------------------------------------
    def hadamard(self, x, block_size, out):
        if x.dtype not in _FLOAT_CODES:
            return UNSUPPORTED
        n = x.shape[-1]
        b = n if block_size == -1 else block_size
        if b > HADAMARD_MAX or x.numel() == 0:
            return UNSUPPORTED if b > HADAMARD_MAX else None
        x = x.contiguous()
        blocks = x.numel() // b
        scale = float(torch.tensor(1.0 / math.sqrt(b), dtype=torch.float32))
        a = kargs(
            "HadamardArgs", x.device, blocks=blocks, block=b, dtype=_FLOAT_CODES[x.dtype], scale_bits=_f32_bits(scale)
        )
        threads = min(256, max(32, b // 2))
        self._run([Launch("cal_hadamard", [x, out, a], (blocks, 1, 1), (threads, 1, 1))])
        return None

    # ---- quantize -------------------------------------------------------------------------
    def quantize_int(self, w, bits, group_size, symmetric, codes, scales, zeros):
        rows, cols = w.shape
        if rows == 0 or cols == 0:
            return UNSUPPORTED  # empty groups: the reference defines them, nothing to launch
        gs = cols if group_size == -1 else group_size
        groups = cols // gs
        a = kargs(
            "QuantizeIntArgs",
            w.device,
            rows=rows,
            cols=cols,
            group=gs,
            groups=groups,
            bits=bits,
            symmetric=int(symmetric),
            dtype=_FLOAT_CODES[w.dtype],
        )
        self._run(
            [Launch("cal_quantize_int", [w.contiguous(), codes, scales, zeros, a], (rows * groups, 1, 1), (128, 1, 1))]
        )
        return None

    def dequantize_int(self, codes, scales, zeros, group_size, dtype, out):
        rows, cols = codes.shape
        if rows * cols == 0:
            return None
        gs = cols if group_size == -1 else group_size
        a = kargs(
            "DequantizeIntArgs",
            codes.device,
            rows=rows,
            cols=cols,
            group=gs,
            groups=cols // gs,
            scale_dtype=_FLOAT_CODES[scales.dtype],
            out_dtype=_FLOAT_CODES[dtype],
        )
        self._run(
            [
                Launch(
                    "cal_dequantize_int",
                    [codes.contiguous(), scales.contiguous(), zeros.contiguous(), out, a],
                    (_blocks(rows * cols, 256), 1, 1),
                    (256, 1, 1),
                )
            ]
        )
        return None

    def quantize_fp4(self, w, format, codes, scales, global_scale):
        rows, cols = w.shape
        mx = format == "mxfp4"
        gsz = 32 if mx else 16
        total = rows * cols
        w = w.contiguous()
        partials = min(_blocks(total, 1024), 1024)
        a = kargs(
            "Fp4Args",
            w.device,
            rows=rows,
            cols=cols,
            group=gsz,
            mx=int(mx),
            dtype=_FLOAT_CODES[w.dtype],
            partials=partials,
        )
        launches = []
        if mx:
            global_scale.fill_(1.0)
        else:
            partial = torch.empty(partials, dtype=torch.float32, device=w.device)
            launches += [
                Launch("cal_fp4_amax_partial", [w, partial, a], (partials, 1, 1), (256, 1, 1)),
                Launch("cal_fp4_amax_final", [partial, global_scale, a], (1, 1, 1), (256, 1, 1)),
            ]
        if total:
            launches.append(
                Launch(
                    "cal_quantize_fp4",
                    [w, codes, scales.view(torch.uint8), global_scale, a],
                    (_blocks(total, 256), 1, 1),
                    (256, 1, 1),
                )
            )
        self._run(launches)
        return None

    def dequantize_fp4(self, codes, scales, global_scale, format, dtype, out):
        rows, cols = codes.shape
        if rows * cols == 0:
            return None
        mx = format == "mxfp4"
        a = kargs(
            "Fp4Args",
            codes.device,
            rows=rows,
            cols=cols,
            group=32 if mx else 16,
            mx=int(mx),
            dtype=_FLOAT_CODES[dtype],
            partials=0,
        )
        self._run(
            [
                Launch(
                    "cal_dequantize_fp4",
                    [codes.contiguous(), scales.contiguous().view(torch.uint8), global_scale.contiguous(), out, a],
                    (_blocks(rows * cols, 256), 1, 1),
                    (256, 1, 1),
                )
            ]
        )
        return None

    # ---- pack -----------------------------------------------------------------------------
    def pack(self, codes, bits, dim, word, out):
        d = 1 if dim == -1 else dim
        rows, cols = codes.shape
        wb = 32 if word == torch.int32 else 8
        words = out.shape[1] if d == 1 else out.shape[0]
        lines = rows if d == 1 else cols
        if lines * words == 0:
            return None
        a = kargs("PackArgs", codes.device, rows=rows, cols=cols, bits=bits, dim=d, word_bits=wb, words=words)
        self._run([Launch("cal_pack", [codes.contiguous(), out, a], (_blocks(lines * words, 256), 1, 1), (256, 1, 1))])
        return None

    def unpack(self, words, bits, dim, length, out):
        d = 1 if dim == -1 else dim
        rows, cols = out.shape
        if rows * cols == 0:
            return None
        nw = words.shape[1] if d == 1 else words.shape[0]
        a = kargs(
            "PackArgs",
            words.device,
            rows=rows,
            cols=cols,
            bits=bits,
            dim=d,
            word_bits=32 if words.dtype == torch.int32 else 8,
            words=nw,
        )
        self._run([Launch("cal_unpack", [words.contiguous(), out, a], (_blocks(rows * cols, 256), 1, 1), (256, 1, 1))])
        return None

    # ---- sparsity -------------------------------------------------------------------------
    def nm_mask(self, scores, n, m, out):
        k = scores.shape[-1]
        rows = scores.numel() // k if k else 0
        if rows * k == 0:
            return None
        a = kargs("NmMaskArgs", scores.device, rows=rows, k=k, n=n, m=m, dtype=_FLOAT_CODES[scores.dtype])
        self._run(
            [
                Launch(
                    "cal_nm_mask",
                    [scores.contiguous(), out.view(torch.uint8), a],
                    (_blocks(rows * k, 256), 1, 1),
                    (256, 1, 1),
                )
            ]
        )
        return None

    def compress_24(self, w, values, meta):
        r, k = w.shape
        if r * k == 0:
            return None
        a = kargs("Sparse24Args", w.device, rows=r, k=k, dtype=_FLOAT_CODES[w.dtype])
        self._run(
            [
                Launch(
                    "cal_compress_24", [w.contiguous(), values, meta, a], (_blocks(r * k // 16, 256), 1, 1), (256, 1, 1)
                )
            ]
        )
        return None

    def decompress_24(self, values, meta, out):
        r, k = out.shape
        if r * k == 0:
            return None
        a = kargs("Sparse24Args", values.device, rows=r, k=k, dtype=_FLOAT_CODES[values.dtype])
        self._run(
            [
                Launch(
                    "cal_decompress_24",
                    [values.contiguous(), meta.contiguous(), out, a],
                    (_blocks(r * k // 16, 256), 1, 1),
                    (256, 1, 1),
                )
            ]
        )
        return None

    # ---- hessian --------------------------------------------------------------------------
    def hessian_accumulate(self, H, x):
        if H.dtype != torch.float32 or x.dtype not in _FLOAT_CODES:
            return UNSUPPORTED  # Metal has no fp64
        d = x.shape[-1]
        X = x.reshape(-1, d).contiguous()
        if X.shape[0] == 0 or d == 0:
            return None
        tiles = -(-d // 32)
        a = kargs("HessianArgs", x.device, n=X.shape[0], d=d, tiles=tiles, dtype=_FLOAT_CODES[x.dtype])
        self._run([Launch("cal_hessian", [H, X, a], (tiles * (tiles + 1) // 2, 1, 1), (256, 1, 1))])
        return None

    # ---- GPTQ / SparseGPT block sweep -------------------------------------------------------
    def _sweep(
        self,
        w,
        u,
        scales,
        zeros,
        group,
        fit,
        mask,
        shrink,
        nm,
        bits,
        symmetric,
        format,
        scale_dtype,
        global_scale,
        outs,
    ):
        q, codes, err, scales_out, zeros_out = outs[:5]
        rows, cols = w.shape
        if rows == 0 or cols == 0:
            scales_out.copy_(scales)
            zeros_out.copy_(zeros)
            return None
        dev = w.device
        dummy = torch.zeros(1, dtype=torch.uint8, device=dev)
        prune = outs[5].view(torch.uint8) if nm is not None else dummy
        has_mask = nm is None and mask.numel() > 0
        a = kargs(
            "GptqSweepArgs",
            dev,
            rows=rows,
            cols=cols,
            groups=scales.shape[1],
            nshrink=shrink.shape[0],
            nm_n=nm[0] if nm else 0,
            nm_m=nm[1] if nm else 0,
            has_mask=int(has_mask),
            bits=bits,
            symmetric=int(symmetric),
            format=SWEEP_FORMATS[format],
            scale_dtype=_FLOAT_CODES[scale_dtype],
            global_scale_bits=_f32_bits(global_scale),
        )
        # the rows' working values, column-major so that neighbouring threads (rows) read neighbouring floats
        xt = torch.empty((cols, rows), dtype=torch.float32, device=dev)
        bufs = [
            w.contiguous(),
            u.contiguous(),
            scales.contiguous(),
            zeros.contiguous(),
            group.contiguous(),
            fit.contiguous(),
            mask.contiguous() if has_mask else dummy,
            shrink.contiguous(),
            xt,
            q,
            codes,
            err,
            scales_out,
            zeros_out,
            prune,
            a,
        ]
        self._run([Launch("cal_gptq_sweep", bufs, (_blocks(rows, 64), 1, 1), (64, 1, 1))])
        return None

    def gptq_block_sweep(
        self, w, u, scales, zeros, group, fit, mask, shrink, bits, symmetric, format, scale_dtype, global_scale, *outs
    ):
        return self._sweep(
            w,
            u,
            scales,
            zeros,
            group,
            fit,
            mask,
            shrink,
            None,
            bits,
            symmetric,
            format,
            scale_dtype,
            global_scale,
            outs,
        )

    def sparsegpt_block_sweep(
        self, w, u, scales, zeros, group, fit, shrink, n, m, bits, symmetric, format, scale_dtype, global_scale, *outs
    ):
        return self._sweep(
            w,
            u,
            scales,
            zeros,
            group,
            fit,
            None,
            shrink,
            (n, m),
            bits,
            symmetric,
            format,
            scale_dtype,
            global_scale,
            outs,
        )

    # ---- W4A16 inference --------------------------------------------------------------------
    def w4a16_repack(self, qweight, out):
        n, kw = qweight.shape
        if n * kw == 0:
            return None
        a = kargs("W4A16Args", qweight.device, m=0, n=n, k=8 * kw, group=8 * kw, groups=1, has_zeros=0, dtype=0)
        self._run(
            [Launch("cal_w4a16_repack", [qweight.contiguous(), out, a], (_blocks(out.numel(), 256), 1, 1), (256, 1, 1))]
        )
        return None

    def w4a16_gemm(self, x, tiled, scales, zeros, group_size, out):
        """``out = x @ dequant(W)^T`` in the op's layout (calibra.ops.w4a16_gemm): GEMV for one row of x
        (decode), the tiled GEMM for more (prefill)."""
        k = x.shape[-1]
        n = tiled.shape[1] // 2
        X = x.reshape(-1, k).contiguous()
        m = X.shape[0]
        if m * n == 0:
            return None
        gs = k if group_size == -1 else group_size
        z = zeros.contiguous() if zeros is not None else torch.zeros(1, dtype=x.dtype, device=x.device)
        a = kargs(
            "W4A16Args",
            x.device,
            m=m,
            n=n,
            k=k,
            group=gs,
            groups=k // gs,
            has_zeros=int(zeros is not None),
            dtype=_FLOAT_CODES[x.dtype],
        )
        bufs = [X, tiled.contiguous(), scales.contiguous(), z, out, a]
        if m == 1:
            launch = Launch("cal_w4a16_gemv", bufs, (n // 64, 1, 1), (256, 1, 1))
        else:
            launch = Launch("cal_w4a16_gemm", bufs, (n // 64, _blocks(m, 32), 1), (256, 1, 1))
        self._run([launch])
        return None


# ---------------------------------------------------------------------------------------------
# MPS


class MpsExecutor:
    """Launches on PyTorch's MPS stream through ``torch.mps.compile_shader`` (compiled once, lazily)."""

    def __init__(self) -> None:
        self._lib = None
        self._lock = threading.Lock()

    def library(self):
        with self._lock:
            if self._lib is None:
                self._lib = torch.mps.compile_shader(library_source())
            return self._lib

    def run(self, launch: Launch) -> None:
        fn = getattr(self.library(), launch.kernel)
        total = tuple(g * t for g, t in zip(launch.groups, launch.threads))
        fn(*launch.buffers, threads=total, group_size=launch.threads)


def load_backend() -> Backend:
    """The MPS backend for calibra._native.load("mps"); ImportError when it cannot run here."""
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        raise ImportError("torch sees no MPS device (the Metal backend runs on Apple Silicon only)")
    if not hasattr(torch.mps, "compile_shader"):
        raise ImportError(f"torch {torch.__version__} has no torch.mps.compile_shader (needs torch >= 2.6)")
    source_dir()  # fail now, with the reason, if the sources were not shipped
    backend = Backend(MpsExecutor())
    backend.BUILD_INFO = {"kernels": "metal", "source": str(source_dir())}
    return backend
