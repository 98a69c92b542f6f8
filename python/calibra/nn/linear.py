"""Drop-in ``nn.Linear`` replacements that run calibra's inference GEMMs.

- :class:`W4A16Linear`: group-wise int4 weights (calibra's RTN/GPTQ integer format, symmetric or
  asymmetric, group 16/32/multiples of 64 or per channel) x fp16/bf16 activations.
- :class:`Sparse24Linear`: a 2:4-sparse weight (calibra's pruners with ``pattern="2:4"``) on sparse
  tensor cores.

On CUDA tensors ``forward`` calls ``calibra.ops.w4a16_gemm`` / ``sparse24_gemm`` (native kernels), and so
does W4A16Linear on MPS tensors (the Metal GEMV/GEMM, never run on Apple hardware yet). Anywhere else it
runs the reference path: rebuild the dense weight exactly (the same bits
``calibra.ops.dequantize`` / ``decompress_24`` give) and ``torch.nn.functional.linear`` -- so on a CPU the
module's output equals the original (dequantized / pruned) Linear's output bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from calibra.ops import _registry
from calibra.ops import gemm as _gemm
from calibra.ops._ref import gemm as _gref
from calibra.ops._ref.sparsity import decompress_24

_ACT = (torch.float16, torch.bfloat16)


def _gpu_native(op: str, x: torch.Tensor) -> bool:
    """True where a GPU backend (CUDA, or Metal on MPS) serves ``op`` for ``x``'s device."""
    return x.device.type in ("cuda", "mps") and op in _registry.native_ops(x.device.type)


def _compute_dtype(dtype: torch.dtype | None, fallback: torch.dtype) -> torch.dtype:
    dtype = dtype or (fallback if fallback in _ACT else torch.float16)
    if dtype not in _ACT:
        raise TypeError(f"[calibra.nn] the compute dtype must be float16 or bfloat16, got {dtype}")
    return dtype


def _check_shape(what: str, out_features: int, in_features: int, n_mult: int) -> None:
    if out_features % n_mult or in_features % _gemm.K_TILE or in_features == 0:
        raise ValueError(
            f"[calibra.nn] {what} needs out_features % {n_mult} == 0 and in_features % {_gemm.K_TILE} == 0, "
            f"got out={out_features}, in={in_features}"
        )


class W4A16Linear(nn.Module):
    """``y = x @ W^T + b`` with ``W[n, k] = (code - zero) * scale`` stored as 4-bit codes in the W4A16 tile
    layout (``calibra.ops.w4a16_repack``), ``scales``/``zeros`` ``[G, N]`` in the compute dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group_size: int,
        symmetric: bool,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        device=None,
    ) -> None:
        super().__init__()
        _check_shape("W4A16Linear", out_features, in_features, 64)
        _gemm._check_group("calibra.nn", group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric, self.dtype = group_size, symmetric, _compute_dtype(dtype, dtype)
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer(
            "tiled", torch.zeros(in_features // 16, 2 * out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=self.dtype, device=device))
        self.register_buffer(
            "zeros", None if symmetric else torch.full((groups, out_features), 8.0, dtype=self.dtype, device=device)
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=self.dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, q, bias: torch.Tensor | None = None, *, dtype: torch.dtype | None = None) -> W4A16Linear:
        """From a ``calibra.ops.QuantizedTensor`` or a ``calibra.quant`` ``QuantizedLayer`` (int, 4 bits,
        no act-order permutation, no rotation). ``dtype`` (default: the weight's if fp16/bf16, else fp16) is
        the compute dtype; scales are stored in it."""
        if getattr(q, "format", "int") != "int" or q.bits != 4:
            raise ValueError(f"[calibra.nn] W4A16Linear needs 4-bit integer weights, got {q.format} {q.bits}-bit")
        if getattr(q, "g_idx", None) is not None or getattr(q, "rotation", None) is not None:
            raise ValueError("[calibra.nn] W4A16Linear does not support act-order (g_idx) or rotated weights")
        out_f, in_f = q.codes.shape
        dtype = _compute_dtype(dtype, q.scales.dtype)
        zeros = q.zeros if q.zeros is not None else None
        mod = cls(
            in_f,
            out_f,
            group_size=q.group_size,
            symmetric=q.symmetric,
            bias=bias is not None,
            dtype=dtype,
            device=q.codes.device,
        )
        from calibra.ops import pack

        tiled, scales, z = _gemm.w4a16_prepare(pack(q.codes, 4), q.scales, zeros, dtype=dtype, symmetric=q.symmetric)
        mod.tiled.copy_(tiled)
        mod.scales.copy_(scales)
        if z is not None:
            mod.zeros.copy_(z)
        if bias is not None:
            mod.bias.copy_(bias.detach().to(dtype))
        return mod

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, group_size: int = 128, symmetric: bool = True, dtype: torch.dtype | None = None
    ) -> W4A16Linear:
        """Quantize ``linear.weight`` with calibra's RTN (``calibra.ops.quantize``) and wrap it."""
        from calibra.ops import quantize

        w = linear.weight.detach()
        _check_shape("W4A16Linear", w.shape[0], w.shape[1], 64)
        dtype = _compute_dtype(dtype, w.dtype)
        q = quantize(w.to(dtype), bits=4, group_size=group_size, symmetric=symmetric)
        return cls.from_quantized(q, linear.bias, dtype=dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight in the compute dtype (bit-identical to ``calibra.ops.dequantize``)."""
        return _gref.w4a16_dequantize(self.tiled, self.scales, self.zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _gpu_native("w4a16_gemm", x):
            y = _gemm.w4a16_gemm(x.to(self.dtype), self.tiled, self.scales, self.zeros, self.group_size)
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"symmetric={self.symmetric}, dtype={self.dtype}, bias={self.bias is not None}"
        )


class Sparse24Linear(nn.Module):
    """``y = x @ W^T + b`` for a 2:4-sparse ``W`` stored as compress_24 values ``[N, K/2]`` plus metadata in
    the ``mma.sp`` register order (``calibra.ops.sparse24_reorder_meta``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        device=None,
    ) -> None:
        super().__init__()
        _check_shape("Sparse24Linear", out_features, in_features, 16)
        self.in_features, self.out_features, self.dtype = in_features, out_features, _compute_dtype(dtype, dtype)
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=self.dtype, device=device))
        # all-zero values with metadata 0x4 per group (indices 0, 1): a valid, empty 2:4 matrix
        self.register_buffer(
            "meta", torch.full((out_features // 16, in_features // 2), 0x44444444, dtype=torch.int32, device=device)
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=self.dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, dtype: torch.dtype | None = None) -> Sparse24Linear:
        """Wrap a Linear whose weight is already 2:4 sparse along in_features (ValueError naming the first
        group with more than 2 nonzeros otherwise)."""
        w = linear.weight.detach()
        dtype = _compute_dtype(dtype, w.dtype)
        mod = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=dtype, device=w.device)
        values, meta = _gemm.sparse24_prepare(w, dtype=dtype)
        mod.values.copy_(values)
        mod.meta.copy_(meta)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().to(dtype))
        return mod

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight in the compute dtype (exactly the wrapped Linear's, rounded to it)."""
        return decompress_24(self.values, _gref.sparse24_unreorder_meta(self.meta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _gpu_native("sparse24_gemm", x):
            y = _gemm.sparse24_gemm(x.to(self.dtype), self.values, self.meta)
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight().to(x.dtype), b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, "
            f"bias={self.bias is not None}"
        )


def replace_linears(model: nn.Module, build: Callable[[str, nn.Linear], nn.Module | None]) -> dict[str, str]:
    """Swap ``nn.Linear`` modules of ``model`` in place.

    ``build(name, linear)`` returns the replacement, or None to keep the Linear. A ValueError/TypeError
    from ``build`` (a shape or format the kernels do not support) keeps the Linear too; its message is
    returned. Returns ``{name: "replaced" | reason kept}`` for every Linear visited.
    """
    result: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        try:
            new = build(name, module)
        except (ValueError, TypeError) as e:
            result[name] = str(e)
            continue
        if new is None:
            result[name] = "kept"
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        result[name] = "replaced"
    return result


def w4a16_from_quantized_model(qmodel, *, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Replace every Linear of ``qmodel.model`` that ``calibra.quantize`` quantized to 4-bit integers
    (``qmodel.layers``) by a :class:`W4A16Linear` built from its codes/scales/zeros. Returns
    :func:`replace_linears`' report."""
    layers = qmodel.layers

    def build(name, linear):
        if name not in layers:
            return None
        return W4A16Linear.from_quantized(layers[name], linear.bias, dtype=dtype)

    return replace_linears(qmodel.model, build)
