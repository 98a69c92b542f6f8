// calibra::hadamard -- normalized fast Walsh-Hadamard transform over the last dimension.
#pragma once
#include "calibra/status.h"
#include "calibra/stream.h"
#include "calibra/tensor_arg.h"

namespace calibra {

struct HadamardParams {
  // x:   [..., n] float32 | float16 | bfloat16 | float64, any strides.
  // out: same shape and dtype as x, contiguous.
  // block_size: power of two dividing n, or -1 for the whole last dim (n a power of two); each consecutive block of the last dim is transformed
  //   independently (block-diagonal H). out = x @ H_b / sqrt(b) per block, H_b the Sylvester
  //   (natural-order) Hadamard matrix. Arithmetic in fp32 (fp64 for float64 input), butterflies
  //   in the same order as calibra.ops._ref.hadamard, so fp32 results equal the reference bit for bit.
  TensorArg x;
  TensorArg out;
  int64_t block_size = 0;
};

Status hadamard_cpu(const HadamardParams& p);
Status hadamard_cuda(const HadamardParams& p, cudaStream_t stream);

}  // namespace calibra
