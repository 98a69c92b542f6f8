// Shared device helpers for calibra's CUDA kernels. Kernels take params structs of raw pointers
// (calibra::TensorArg) and run on the caller's stream; they never allocate device memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "calibra/status.h"
#include "calibra/tensor_arg.h"

namespace calibra {
namespace cuda {

// Shape and strides of a tensor, passed by value into a kernel (TensorArg without the pointer).
struct Layout {
  int32_t ndim;
  int64_t shape[kMaxDims];
  int64_t strides[kMaxDims];

  __host__ static Layout of(const TensorArg& t) {
    Layout l{};
    l.ndim = t.ndim;
    for (int i = 0; i < t.ndim; ++i) {
      l.shape[i] = t.shape[i];
      l.strides[i] = t.strides[i];
    }
    return l;
  }
  // Element offset of the first element of row r (rows = all dims but the last).
  __device__ __host__ int64_t row_offset(int64_t r) const {
    int64_t off = 0;
    for (int i = ndim - 2; i >= 0; --i) {
      off += (r % shape[i]) * strides[i];
      r /= shape[i];
    }
    return off;
  }
};

template <class T> __device__ __forceinline__ float load_f32(const T* p);
template <> __device__ __forceinline__ float load_f32<float>(const float* p) { return *p; }
template <> __device__ __forceinline__ float load_f32<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load_f32<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <class T> __device__ __forceinline__ T store_f32(float v);
template <> __device__ __forceinline__ float store_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls f(T{}) with T = float | __half | __nv_bfloat16 | double for a floating dtype.
template <class F>
bool dispatch_floating(DType t, F&& f) {
  switch (t) {
    case DType::F32: f(float{}); return true;
    case DType::F16: f(__half{}); return true;
    case DType::BF16: f(__nv_bfloat16{}); return true;
    case DType::F64: f(double{}); return true;
    default: return false;
  }
}

inline Status launch_status(const char* op) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return make_status(StatusCode::kDeviceError, "[%s] CUDA launch failed: %s", op, cudaGetErrorString(err));
  return Status::Ok();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace calibra
