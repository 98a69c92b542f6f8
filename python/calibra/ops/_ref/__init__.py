"""Pure-torch references of every calibra op: clear rather than fast, fp32 (fp64 for Hessian work).

They are registered as the ops' default implementations and are the test oracle. Native kernels must
equal them: integer outputs exactly, floats within the tolerance each test states.
"""

from calibra.ops._ref.gemm import sparse24_gemm, sparse24_reorder_meta, w4a16_gemm, w4a16_repack
from calibra.ops._ref.gptq import gptq_block_sweep, sparsegpt_block_sweep
from calibra.ops._ref.hadamard import hadamard
from calibra.ops._ref.hessian import hessian_accumulate
from calibra.ops._ref.pack import pack, unpack
from calibra.ops._ref.quantize import dequantize_fp4, dequantize_int, quantize_fp4, quantize_int
from calibra.ops._ref.sparsity import compress_24, decompress_24, nm_mask

__all__ = [
    "hadamard",
    "hessian_accumulate",
    "pack",
    "unpack",
    "quantize_int",
    "dequantize_int",
    "quantize_fp4",
    "dequantize_fp4",
    "nm_mask",
    "compress_24",
    "decompress_24",
    "gptq_block_sweep",
    "sparsegpt_block_sweep",
    "sparse24_gemm",
    "sparse24_reorder_meta",
    "w4a16_gemm",
    "w4a16_repack",
]
