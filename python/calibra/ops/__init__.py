"""calibra.ops: every kernel-level op of calibra, one torch.library op each (``torch.ops.calibra.*``).

Each op has a pure-torch reference (``calibra.ops._ref``), registered as the default
implementation, and native kernels per device (CPU always; CUDA and Metal when built). Use
:func:`trace` to see which implementation served a call.
"""

from calibra.ops._registry import OPS, native_ops, trace
from calibra.ops.gemm import sparse24_gemm, sparse24_reorder_meta, w4a16_gemm, w4a16_repack
from calibra.ops.gptq import gptq_block_sweep, sparsegpt_block_sweep
from calibra.ops.hadamard import hadamard
from calibra.ops.hessian import hessian_accumulate
from calibra.ops.pack import pack, unpack
from calibra.ops.quantize import QuantizedTensor, dequantize, quantize
from calibra.ops.sparsity import compress_24, decompress_24, nm_mask

# isort: split
# Backend registrations come last: they register natives for the ops defined above.
from calibra.ops import _cpu, _cuda, _mps  # noqa: F401

__all__ = [
    "OPS",
    "native_ops",
    "trace",
    "hadamard",
    "hessian_accumulate",
    "pack",
    "unpack",
    "quantize",
    "dequantize",
    "QuantizedTensor",
    "nm_mask",
    "compress_24",
    "decompress_24",
    "gptq_block_sweep",
    "sparsegpt_block_sweep",
    "w4a16_repack",
    "w4a16_gemm",
    "sparse24_reorder_meta",
    "sparse24_gemm",
]
