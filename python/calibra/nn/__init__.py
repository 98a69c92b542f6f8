"""calibra.nn: drop-in Linear replacements for calibra-compressed weights, backed by the inference GEMMs
(``calibra.ops.w4a16_gemm``, ``calibra.ops.sparse24_gemm``) on CUDA and an exact dense path elsewhere."""

from calibra.nn.linear import Sparse24Linear, W4A16Linear, replace_linears, w4a16_from_quantized_model

__all__ = ["W4A16Linear", "Sparse24Linear", "replace_linears", "w4a16_from_quantized_model"]
