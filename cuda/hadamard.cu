// calibra::hadamard on CUDA: one thread block per (row, Hadamard block). The block's values live in
// shared memory (fp32, or fp64 for double input) for all log2(b) butterfly stages, so global memory
// is read once and written once -- the transform is memory-bound, and this keeps it at one pass.
#include <cmath>

#include "calibra/params/hadamard.h"
#include "common.cuh"

namespace calibra {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSharedBlock = 8192;  // 32 KiB of fp32: fits the default 48 KiB without opt-in

template <class T, class C>
__global__ void hadamard_kernel(const T* __restrict__ x, cuda::Layout xl, T* __restrict__ out, int64_t n,
                                int64_t b, C scale) {
  extern __shared__ unsigned char smem_raw[];
  C* buf = reinterpret_cast<C*>(smem_raw);
  const int64_t blocks_per_row = n / b;
  const int64_t row = blockIdx.x / blocks_per_row;
  const int64_t k = (blockIdx.x % blocks_per_row) * b;
  const int64_t col_stride = xl.strides[xl.ndim - 1];
  const T* xr = x + xl.row_offset(row);
  for (int64_t j = threadIdx.x; j < b; j += blockDim.x) {
    if constexpr (sizeof(C) == 8) buf[j] = static_cast<C>(xr[(k + j) * col_stride]);
    else buf[j] = cuda::load_f32(xr + (k + j) * col_stride);
  }
  __syncthreads();
  for (int64_t h = 1; h < b; h <<= 1) {
    for (int64_t t = threadIdx.x; t < b / 2; t += blockDim.x) {
      const int64_t i = (t / h) * 2 * h + (t % h);
      const C u = buf[i], v = buf[i + h];
      buf[i] = u + v;
      buf[i + h] = u - v;
    }
    __syncthreads();
  }
  T* orow = out + row * n + k;
  for (int64_t j = threadIdx.x; j < b; j += blockDim.x) {
    if constexpr (sizeof(C) == 8) orow[j] = static_cast<T>(buf[j] * scale);
    else orow[j] = cuda::store_f32<T>(buf[j] * scale);
  }
}

}  // namespace

Status hadamard_cuda(const HadamardParams& p, cudaStream_t stream) {
  if (p.x.ndim < 1 || p.x.dtype != p.out.dtype || p.out.numel() != p.x.numel() || !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[hadamard] out must be a contiguous tensor shaped and typed like x");
  const int64_t n = p.x.size(-1);
  const int64_t b = p.block_size == -1 ? n : p.block_size;
  if (b < 1 || n % b != 0 || (b & (b - 1)) != 0)
    return make_status(StatusCode::kInvalidArgument, "[hadamard] block_size %lld must be a power of two dividing %lld",
                       static_cast<long long>(b), static_cast<long long>(n));
  if (b > kMaxSharedBlock)
    return make_status(StatusCode::kUnsupported,
                       "[hadamard] the CUDA kernel transforms blocks of at most %lld elements, got %lld",
                       static_cast<long long>(kMaxSharedBlock), static_cast<long long>(b));
  if (p.x.numel() == 0) return Status::Ok();
  const int64_t grid = p.x.rows() * (n / b);
  const cuda::Layout xl = cuda::Layout::of(p.x);
  const double inv = 1.0 / std::sqrt(static_cast<double>(b));
  bool ok = cuda::dispatch_floating(p.x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const size_t shmem = static_cast<size_t>(b) * sizeof(C);
    hadamard_kernel<T, C><<<static_cast<unsigned>(grid), kThreads, shmem, stream>>>(
        p.x.ptr<const T>(), xl, p.out.ptr<T>(), n, b, static_cast<C>(inv));
  });
  if (!ok)
    return make_status(StatusCode::kInvalidArgument, "[hadamard] x must be floating point, got %s", dtype_name(p.x.dtype));
  return cuda::launch_status("hadamard");
}

}  // namespace calibra
