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

// The checks both backends make before running (shapes, contiguity, dtypes).
inline Status check_hessian_accumulate(const HessianParams& p) {
  const char* op = "[hessian_accumulate]";
  if (p.x.ndim < 1) return make_status(StatusCode::kInvalidArgument, "%s x must have at least 1 dims", op);
  const int64_t d = p.x.size(-1);
  if (p.H.ndim != 2 || p.H.shape[0] != d || p.H.shape[1] != d)
    return make_status(StatusCode::kInvalidArgument, "%s H must be [d, d] with d = x.shape[-1] = %lld", op,
                       static_cast<long long>(d));
  if (!p.H.is_contiguous()) return make_status(StatusCode::kInvalidArgument, "%s H must be contiguous", op);
  if (p.H.dtype != DType::F32 && p.H.dtype != DType::F64)
    return make_status(StatusCode::kInvalidArgument, "%s H must be float32 or float64, got %s", op,
                       dtype_name(p.H.dtype));
  if (!is_floating(p.x.dtype))
    return make_status(StatusCode::kInvalidArgument, "%s x must be floating point, got %s", op, dtype_name(p.x.dtype));
  return Status::Ok();
}

Status hessian_accumulate_cpu(const HessianParams& p);
Status hessian_accumulate_cuda(const HessianParams& p, cudaStream_t stream);
// The micro-kernel ISA the CPU path picks on this machine: "avx512", "avx2" or "portable"
// (CALIBRA_CPU_ISA=avx2|portable lowers it, for tests and benchmarks).
const char* hessian_accumulate_cpu_isa();

}  // namespace calibra
