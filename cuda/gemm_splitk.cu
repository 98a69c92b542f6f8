// Split-K reduction shared by the inference GEMMs: out[m, n] = sum_s ws[s, m, n], summed in split order so
// the result does not depend on which thread block finished first. The workspace comes from Python.
#include "gemm_common.cuh"

namespace calibra {
namespace gemm {
namespace {

template <class T>
__global__ void splitk_reduce_kernel(const float* __restrict__ ws, int64_t splits, int64_t mn, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < mn;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int64_t sp = 0; sp < splits; ++sp) s += ws[sp * mn + i];
    out[i] = cuda::store_f32<T>(s);
  }
}

}  // namespace

Status splitk_reduce(const float* ws, int64_t splits, int64_t M, int64_t N, DType dtype, void* out, cudaStream_t stream) {
  const int64_t mn = M * N;
  if (mn == 0) return Status::Ok();
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(mn, 256), 4096));
  if (dtype == DType::F16)
    splitk_reduce_kernel<__half><<<grid, 256, 0, stream>>>(ws, splits, mn, static_cast<__half*>(out));
  else
    splitk_reduce_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(ws, splits, mn, static_cast<__nv_bfloat16*>(out));
  return cuda::launch_status("splitk_reduce");
}

}  // namespace gemm
}  // namespace calibra
