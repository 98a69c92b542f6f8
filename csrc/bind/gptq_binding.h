// Argument conversions shared by the CPU and CUDA bindings of gptq_block_sweep / sparsegpt_block_sweep.
#pragma once

#include <string>

#include "binding.h"
#include "calibra/params/gptq.h"

namespace calibra_bind {

inline calibra::SweepFormat sweep_format(const std::string& s) {
  calibra::SweepFormat f;
  if (!calibra::parse_sweep_format(s.c_str(), &f))
    throw py::value_error("[gptq_block_sweep] format must be 'int', 'mxfp4', 'nvfp4' or 'none', got '" + s + "'");
  return f;
}

// sparsegpt_block_sweep has no mask input (the sweep chooses it): the shared params get an empty one.
inline calibra::TensorArg no_mask() {
  calibra::TensorArg t;
  t.dtype = calibra::DType::U8;
  t.ndim = 1;
  t.shape[0] = 0;
  t.strides[0] = 1;
  return t;
}

}  // namespace calibra_bind
