// Tensor set-up shared by the CPU (bench_common.h) and CUDA C++ benchmarks; no other dependency.
#pragma once
#include <cstdint>
#include <vector>

#include "calibra/tensor_arg.h"

namespace calibra {
namespace bench {

// A contiguous TensorArg over `data` with the given shape.
inline TensorArg contiguous(void* data, DType dtype, std::vector<int64_t> shape) {
  TensorArg t;
  t.data = data;
  t.dtype = dtype;
  t.ndim = static_cast<int32_t>(shape.size());
  int64_t stride = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.strides[i] = stride;
    stride *= shape[i];
  }
  return t;
}

}  // namespace bench
}  // namespace calibra
