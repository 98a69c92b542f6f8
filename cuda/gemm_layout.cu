// calibra::w4a16_repack and calibra::sparse24_reorder_meta on CUDA: one thread per output word, the index
// maps of params/gemm_layout.h (shared with csrc/cpu/gemm.cpp). Load-time only.
#include "calibra/params/gemm.h"
#include "calibra/params/gemm_layout.h"
#include "common.cuh"

namespace calibra {
namespace {

constexpr int kThreads = 256;

__global__ void w4a16_repack_kernel(const uint32_t* __restrict__ q, int64_t qs0, int64_t qs1, int64_t N, int64_t K,
                                    uint32_t* __restrict__ out) {
  const int64_t total = (K / 16) * 2 * N;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[idx] = gemm_layout::w4a16_repacked_word(q, qs0, qs1, idx / (2 * N), idx % (2 * N));
}

__global__ void sparse24_reorder_meta_kernel(const uint16_t* __restrict__ m, int64_t ms0, int64_t ms1, int64_t N, int64_t KW,
                                             uint32_t* __restrict__ out) {
  const int64_t total = (N / 16) * 8 * KW;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[idx] = gemm_layout::sparse24_reordered_word(m, ms0, ms1, idx / (8 * KW), idx % (8 * KW));
}

unsigned grid_for(int64_t total) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(int64_t{1} << 20, cuda::ceil_div(total, kThreads))));
}

}  // namespace

Status w4a16_repack_cuda(const W4A16RepackParams& p, cudaStream_t stream) {
  const TensorArg& q = p.qweight;
  int64_t N = 0, K = 0;
  CALIBRA_RETURN_IF_ERROR(gemm_layout::check_w4a16_repack(p, N, K));
  const int64_t total = (K / 16) * 2 * N;
  if (total == 0) return Status::Ok();
  w4a16_repack_kernel<<<grid_for(total), kThreads, 0, stream>>>(q.ptr<const uint32_t>(), q.strides[0], q.strides[1], N, K,
                                                                p.out.ptr<uint32_t>());
  return cuda::launch_status("w4a16_repack");
}

Status sparse24_reorder_meta_cuda(const Sparse24ReorderMetaParams& p, cudaStream_t stream) {
  const TensorArg& m = p.meta;
  int64_t N = 0, KW = 0;
  CALIBRA_RETURN_IF_ERROR(gemm_layout::check_sparse24_reorder_meta(p, N, KW));
  const int64_t total = (N / 16) * 8 * KW;
  if (total == 0) return Status::Ok();
  sparse24_reorder_meta_kernel<<<grid_for(total), kThreads, 0, stream>>>(m.ptr<const uint16_t>(), m.strides[0], m.strides[1],
                                                                         N, KW, p.out.ptr<uint32_t>());
  return cuda::launch_status("sparse24_reorder_meta");
}

}  // namespace calibra
