// calibra::hessian_accumulate -- H += X^T X, the GPTQ-style Hessian of a linear layer's inputs.
#pragma once
#include "calibra/status.h"
#include "calibra/stream.h"
#include "calibra/tensor_arg.h"

namespace calibra {

struct HessianParams {
  // H: [d, d] float32 | float64, contiguous, updated in place. H is taken to be symmetric: only its
  //    lower triangle (row >= col) is read; the result is written to the lower triangle and mirrored,
  //    so on return H is exactly symmetric.
  // x: [..., d] float32 | float16 | bfloat16 | float64, any strides; X = x.reshape(-1, d), N rows.
  // H += X^T X, products and sums in H's dtype (x is converted to it exactly for fp16/bf16; fp64 x
  // into fp32 H is rounded to fp32 first). N = 0 leaves H untouched (not even mirrored).
  // NaN/Inf in x propagate into H (no check here: the calibration engine checks activations).
  TensorArg H;
  TensorArg x;
};

Status hessian_accumulate_cpu(const HessianParams& p);
Status hessian_accumulate_cuda(const HessianParams& p, cudaStream_t stream);
// The micro-kernel ISA the CPU path picks on this machine: "avx512", "avx2" or "portable"
// (CALIBRA_CPU_ISA=avx2|portable lowers it, for tests and benchmarks).
const char* hessian_accumulate_cpu_isa();

}  // namespace calibra
