// calibra::w4a16_repack and calibra::sparse24_reorder_meta on CUDA: one thread per output word, the index
// maps of params/gemm.h written out (the same formulas as csrc/cpu/gemm.cpp). Load-time only.
#include "calibra/params/gemm.h"
#include "common.cuh"

namespace calibra {
namespace {

constexpr int kThreads = 256;

__global__ void w4a16_repack_kernel(const uint32_t* __restrict__ q, int64_t qs0, int64_t qs1, int64_t N, int64_t K,
                                    uint32_t* __restrict__ out) {
  const int64_t total = (K / 16) * 2 * N;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t kt = idx / (2 * N), w = idx % (2 * N);
    const int64_t b = w / 128, lane = (w % 128) / 4, j = w % 4;
    const int64_t g = lane / 4, t = lane % 4;
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int a = i % 4, c = i / 4;
      const int64_t n = 64 * b + 16 * j + g + 8 * (a >> 1);
      const int64_t k = 16 * kt + 2 * t + c + 8 * (a & 1);
      word |= ((q[n * qs0 + (k / 8) * qs1] >> (4 * (k % 8))) & 0xFu) << (4 * i);
    }
    out[idx] = word;
  }
}

__global__ void sparse24_reorder_meta_kernel(const uint16_t* __restrict__ m, int64_t ms0, int64_t ms1, int64_t N, int64_t KW,
                                             uint32_t* __restrict__ out) {
  const int64_t total = (N / 16) * 8 * KW;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t rt = idx / (8 * KW), col = idx % (8 * KW);
    const int64_t kq = col / 16, g = (col % 16) / 2, h = col % 2;
    const uint32_t lo = m[(16 * rt + g) * ms0 + (2 * kq + h) * ms1];
    const uint32_t hi = m[(16 * rt + g + 8) * ms0 + (2 * kq + h) * ms1];
    out[idx] = lo | (hi << 16);
  }
}

unsigned grid_for(int64_t total) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(int64_t{1} << 20, cuda::ceil_div(total, kThreads))));
}

}  // namespace

Status w4a16_repack_cuda(const W4A16RepackParams& p, cudaStream_t stream) {
  const TensorArg& q = p.qweight;
  if (q.ndim != 2 || q.dtype != DType::I32)
    return make_status(StatusCode::kInvalidArgument, "[w4a16_repack] qweight must be a 2-D int32 tensor");
  const int64_t N = q.shape[0], K = q.shape[1] * 8;
  if (N % 64 != 0 || K % 16 != 0)
    return make_status(StatusCode::kInvalidArgument, "[w4a16_repack] need out_features %% 64 == 0 and in_features %% 16 == 0");
  if (p.out.dtype != DType::I32 || p.out.ndim != 2 || p.out.shape[0] != K / 16 || p.out.shape[1] != 2 * N ||
      !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[w4a16_repack] out must be contiguous int32 [K/16, 2N]");
  const int64_t total = (K / 16) * 2 * N;
  if (total == 0) return Status::Ok();
  w4a16_repack_kernel<<<grid_for(total), kThreads, 0, stream>>>(q.ptr<const uint32_t>(), q.strides[0], q.strides[1], N, K,
                                                                p.out.ptr<uint32_t>());
  return cuda::launch_status("w4a16_repack");
}

Status sparse24_reorder_meta_cuda(const Sparse24ReorderMetaParams& p, cudaStream_t stream) {
  const TensorArg& m = p.meta;
  if (m.ndim != 2 || m.dtype != DType::I16)
    return make_status(StatusCode::kInvalidArgument, "[sparse24_reorder_meta] meta must be a 2-D int16 tensor");
  const int64_t N = m.shape[0], KW = m.shape[1];
  if (N % 16 != 0 || KW % 2 != 0)
    return make_status(StatusCode::kInvalidArgument, "[sparse24_reorder_meta] need rows %% 16 == 0 and columns %% 32 == 0");
  if (p.out.dtype != DType::I32 || p.out.ndim != 2 || p.out.shape[0] != N / 16 || p.out.shape[1] != 8 * KW ||
      !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[sparse24_reorder_meta] out must be contiguous int32 [N/16, K/2]");
  const int64_t total = (N / 16) * 8 * KW;
  if (total == 0) return Status::Ok();
  sparse24_reorder_meta_kernel<<<grid_for(total), kThreads, 0, stream>>>(m.ptr<const uint16_t>(), m.strides[0], m.strides[1],
                                                                         N, KW, p.out.ptr<uint32_t>());
  return cuda::launch_status("sparse24_reorder_meta");
}

}  // namespace calibra
