#include <string>

#include "binding.h"
#include "calibra/params/gptq.h"

namespace {
calibra::SweepFormat sweep_format(const std::string& s) {
  calibra::SweepFormat f;
  if (!calibra::parse_sweep_format(s.c_str(), &f))
    throw py::value_error("[gptq_block_sweep] format must be 'int', 'mxfp4', 'nvfp4' or 'none', got '" + s + "'");
  return f;
}

// sparsegpt_block_sweep has no mask input (the sweep chooses it): the shared params get an empty one.
calibra::TensorArg no_mask() {
  calibra::TensorArg t;
  t.dtype = calibra::DType::U8;
  t.ndim = 1;
  t.shape[0] = 0;
  t.strides[0] = 1;
  return t;
}
}  // namespace

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
