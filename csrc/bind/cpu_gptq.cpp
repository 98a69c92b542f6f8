#include <string>

#include "gptq_binding.h"

using calibra_bind::no_mask;
using calibra_bind::sweep_format;

CALIBRA_BINDINGS(gptq) {
  using calibra::TensorArg;
  m.def(
      "gptq_block_sweep",
      [](TensorArg w, TensorArg u, TensorArg scales, TensorArg zeros, TensorArg group, TensorArg fit, TensorArg mask,
         TensorArg shrink, int64_t bits, bool symmetric, const std::string& format, int scale_dtype, double global_scale,
         TensorArg q, TensorArg codes, TensorArg err, TensorArg scales_out, TensorArg zeros_out) {
        calibra::GptqSweepParams p{w, u, scales, zeros, group, fit, mask, shrink, q, codes, err, scales_out, zeros_out,
                                   bits, symmetric, sweep_format(format), static_cast<calibra::DType>(scale_dtype),
                                   static_cast<float>(global_scale), {}};
        calibra::bind::call_released([&] { return calibra::gptq_block_sweep_cpu(p); });
      },
      "GPTQ column sweep over one block (see params/gptq.h).");
  m.def(
      "sparsegpt_block_sweep",
      [](TensorArg w, TensorArg u, TensorArg scales, TensorArg zeros, TensorArg group, TensorArg fit, TensorArg shrink,
         int64_t n, int64_t nm, int64_t bits, bool symmetric, const std::string& format, int scale_dtype,
         double global_scale, TensorArg q, TensorArg codes, TensorArg err, TensorArg scales_out, TensorArg zeros_out,
         TensorArg prune) {
        calibra::SparsegptSweepParams p{
            {w, u, scales, zeros, group, fit, no_mask(), shrink, q, codes, err, scales_out, zeros_out, bits, symmetric,
             sweep_format(format), static_cast<calibra::DType>(scale_dtype), static_cast<float>(global_scale), {}},
            n, nm, prune};
        calibra::bind::call_released([&] { return calibra::sparsegpt_block_sweep_cpu(p); });
      },
      "SparseGPT's N:M column sweep over one block, choosing the mask inside it (see params/gptq.h).");
}
