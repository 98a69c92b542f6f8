"""Type stub of ``calibra._cpu``, the pybind11 module of the CPU kernels (csrc/bind/module_common.cpp and
csrc/bind/cpu_<family>.cpp). tests/test_cpu_stub.py fails when this file and the built module disagree
on the public names, so the stub cannot drift from the bindings.

The module is torch-free: a tensor crosses as a ``_TensorArg`` tuple built by
:func:`calibra._native.tensor_arg` (the bindings' ``TensorArg``; private here because only the stub has
the name). Every kernel writes into its ``out`` tensors (allocated by the op's shape function) and
returns None; a failed check raises ValueError (bad argument, NaN/Inf),
NotImplementedError (unsupported case) or RuntimeError. Kernels run without the GIL.
"""

from typing import Any, TypeAlias

_TensorArg: TypeAlias = tuple[int, tuple[int, ...], tuple[int, ...], int]
"""``(data_ptr, shape, strides, dtype_code)``; dtype codes: calibra._native.DTYPE_CODES."""

BUILD_INFO: dict[str, Any]
"""``module``, ``compiler``, ``families`` (the op families bound, in registration order)."""

# module_common.cpp
def set_num_threads(n: int, /) -> None: ...
def num_threads() -> int: ...

# cpu_quantize.cpp (params/quantize.h)
def quantize_int(
    w: _TensorArg, bits: int, group_size: int, symmetric: bool, codes: _TensorArg, scales: _TensorArg, zeros: _TensorArg
) -> None: ...
def dequantize_int(
    codes: _TensorArg, scales: _TensorArg, zeros: _TensorArg, group_size: int, dtype: object, out: _TensorArg
) -> None: ...
def quantize_fp4(
    w: _TensorArg, format: str, codes: _TensorArg, scales: _TensorArg, global_scale: _TensorArg
) -> None: ...
def dequantize_fp4(
    codes: _TensorArg, scales: _TensorArg, global_scale: _TensorArg, format: str, dtype: object, out: _TensorArg
) -> None: ...
def float_to_e4m3(x: _TensorArg, out: _TensorArg) -> None: ...

# cpu_pack.cpp (params/pack.h)
def pack(codes: _TensorArg, bits: int, dim: int, word: object, out: _TensorArg) -> None: ...
def unpack(words: _TensorArg, bits: int, dim: int, length: int, out: _TensorArg) -> None: ...

# cpu_hadamard.cpp (params/hadamard.h)
def hadamard(x: _TensorArg, block_size: int, out: _TensorArg) -> None: ...

# cpu_hessian.cpp (params/hessian.h)
def hessian_accumulate(H: _TensorArg, x: _TensorArg) -> None: ...
def hessian_accumulate_isa() -> str: ...

# cpu_sparsity.cpp (params/sparsity.h)
def nm_mask(scores: _TensorArg, n: int, m: int, out: _TensorArg) -> None: ...
def compress_24(w: _TensorArg, values: _TensorArg, meta: _TensorArg) -> None: ...
def decompress_24(values: _TensorArg, meta: _TensorArg, out: _TensorArg) -> None: ...

# cpu_gptq.cpp (params/gptq.h); the bindings name no arguments, so they are positional only
def gptq_block_sweep(
    w: _TensorArg,
    u: _TensorArg,
    scales: _TensorArg,
    zeros: _TensorArg,
    group: _TensorArg,
    fit: _TensorArg,
    mask: _TensorArg,
    shrink: _TensorArg,
    bits: int,
    symmetric: bool,
    format: str,
    scale_dtype: int,
    global_scale: float,
    q: _TensorArg,
    codes: _TensorArg,
    err: _TensorArg,
    scales_out: _TensorArg,
    zeros_out: _TensorArg,
    /,
) -> None: ...
def sparsegpt_block_sweep(
    w: _TensorArg,
    u: _TensorArg,
    scales: _TensorArg,
    zeros: _TensorArg,
    group: _TensorArg,
    fit: _TensorArg,
    shrink: _TensorArg,
    n: int,
    nm: int,
    bits: int,
    symmetric: bool,
    format: str,
    scale_dtype: int,
    global_scale: float,
    q: _TensorArg,
    codes: _TensorArg,
    err: _TensorArg,
    scales_out: _TensorArg,
    zeros_out: _TensorArg,
    prune: _TensorArg,
    /,
) -> None: ...

# cpu_gemm.cpp (params/gemm.h)
W4A16_N_TILE: int
W4A16_M_TILE_MIN: int
SPARSE24_N_TILE: int
SPARSE24_M_TILE_MIN: int

def gemm_split_k(m: int, n: int, k: int, sms: int, n_tile: int, m_tile_min: int) -> int: ...
def w4a16_repack(qweight: _TensorArg, out: _TensorArg) -> None: ...
def w4a16_gemm(
    x: _TensorArg, tiled: _TensorArg, scales: _TensorArg, zeros: _TensorArg | None, group: int, out: _TensorArg
) -> None: ...
def sparse24_reorder_meta(meta: _TensorArg, out: _TensorArg) -> None: ...
def sparse24_gemm(x: _TensorArg, values: _TensorArg, meta: _TensorArg, out: _TensorArg) -> None: ...
