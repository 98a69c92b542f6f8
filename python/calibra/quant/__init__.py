"""Quantization solvers for one weight matrix: RTN, GPTQ, MR-GPTQ.

Each takes a weight (and, for GPTQ/MR-GPTQ, the Hessian sum X^T X with its token count) and returns a
:class:`QuantizedLayer`; none of them modifies its inputs. Configs are validated before any weight is
loaded (``config.validate()``, :func:`check_layers`).
"""

from calibra.quant.config import GPTQConfig, MRGPTQConfig, RTNConfig, check_layers
from calibra.quant.gptq import gptq_quantize
from calibra.quant.mr_gptq import mr_gptq_quantize
from calibra.quant.result import ModuleLog, QuantizedLayer
from calibra.quant.rtn import rtn_quantize

__all__ = [
    "RTNConfig",
    "GPTQConfig",
    "MRGPTQConfig",
    "check_layers",
    "rtn_quantize",
    "gptq_quantize",
    "mr_gptq_quantize",
    "QuantizedLayer",
    "ModuleLog",
]
