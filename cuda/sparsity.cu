// calibra::nm_mask, calibra::compress_24, calibra::decompress_24 on CUDA. nm_mask: one thread per
// element, which ranks itself against its group (the group's other m-1 loads hit L1). 2:4: one thread
// per 16-column chunk (one metadata word). Data errors lower the err flag to the row-major index of
// the offending element / group / metadata group with an atomic min; nothing is allocated here.
#include "calibra/params/sparsity.h"
#include "common.cuh"

namespace calibra {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

unsigned grid_for(int64_t total) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(kMaxBlocks, cuda::ceil_div(total, kThreads))));
}

template <class T>
__global__ void nm_mask_kernel(const T* __restrict__ x, cuda::Layout xl, int64_t rows, int64_t k, int n, int m,
                               bool* __restrict__ out, unsigned long long* __restrict__ err) {
  const int64_t total = rows * k;
  const int64_t cs = xl.strides[xl.ndim - 1];
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / k, j = idx % k;
    const int64_t g0 = j - j % m;
    const int jj = static_cast<int>(j - g0);
    const T* base = x + xl.row_offset(r) + g0 * cs;
    const float vj = cuda::load_f32(base + jj * cs);
    if (vj != vj) atomicMin(err, static_cast<unsigned long long>(idx));
    int rank = 0;
    for (int i = 0; i < m; ++i) {
      const float vi = cuda::load_f32(base + i * cs);
      rank += static_cast<int>(vi > vj) + static_cast<int>((i < jj) & (vi == vj));
    }
    out[idx] = rank < n;
  }
}

__device__ __forceinline__ bool nonzero(float v) { return v != 0.0f; }
__device__ __forceinline__ bool nonzero(uint16_t v) { return (v & 0x7fffu) != 0; }

template <class T>
__device__ __forceinline__ T pick4(T a, T b, T c, T d, unsigned i) {
  return i == 0 ? a : i == 1 ? b : i == 2 ? c : d;
}

template <class T>
__global__ void compress_24_kernel(const T* __restrict__ w, int64_t s0, int64_t s1, int64_t R, int64_t K,
                                   T* __restrict__ vals, uint16_t* __restrict__ meta, unsigned long long* __restrict__ err) {
  const int64_t kw = K / 16, total = R * kw;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / kw, j = idx % kw;
    const T* wr = w + r * s0 + 16 * j * s1;
    T* vr = vals + r * (K / 2) + 8 * j;
    unsigned word = 0;
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const T a = wr[(4 * g) * s1], b = wr[(4 * g + 1) * s1], c = wr[(4 * g + 2) * s1], d = wr[(4 * g + 3) * s1];
      const unsigned nz = static_cast<unsigned>(nonzero(a)) | (static_cast<unsigned>(nonzero(b)) << 1) |
                          (static_cast<unsigned>(nonzero(c)) << 2) | (static_cast<unsigned>(nonzero(d)) << 3);
      unsigned sel = nz;
      if (__popc(sel) > 2) {
        atomicMin(err, static_cast<unsigned long long>(r * (K / 4) + 4 * j + g));
        sel = 0x3;
      }
      while (__popc(sel) < 2) sel |= ~sel & (sel + 1);  // add the lowest unused index
      const unsigned i0 = static_cast<unsigned>(__ffs(static_cast<int>(sel)) - 1);
      const unsigned i1 = static_cast<unsigned>(__ffs(static_cast<int>(sel & (sel - 1))) - 1);
      vr[2 * g] = pick4(a, b, c, d, i0);
      vr[2 * g + 1] = pick4(a, b, c, d, i1);
      word |= (i0 | (i1 << 2)) << (4 * g);
    }
    meta[idx] = static_cast<uint16_t>(word);
  }
}

template <class T>
__global__ void decompress_24_kernel(const T* __restrict__ vals, int64_t vs0, int64_t vs1, const uint16_t* __restrict__ meta,
                                     int64_t ms0, int64_t ms1, int64_t R, int64_t kw, T* __restrict__ out,
                                     unsigned long long* __restrict__ err) {
  const int64_t total = R * kw;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / kw, j = idx % kw;
    const unsigned word = meta[r * ms0 + j * ms1];
    T* o = out + r * (16 * kw) + 16 * j;
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const unsigned i0 = (word >> (4 * g)) & 3u, i1 = (word >> (4 * g + 2)) & 3u;
      if (i0 >= i1) atomicMin(err, static_cast<unsigned long long>(idx * 4 + g));
      const T a = vals[r * vs0 + (8 * j + 2 * g) * vs1];
      const T b = vals[r * vs0 + (8 * j + 2 * g + 1) * vs1];
#pragma unroll
      for (unsigned i = 0; i < 4; ++i) o[4 * g + i] = i == i1 ? b : i == i0 ? a : T{};
    }
  }
}

bool is_sparse_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

bool err_ok(const TensorArg& e) { return e.dtype == DType::I64 && e.numel() >= 1; }

}  // namespace

Status nm_mask_cuda(const NmMaskParams& p, cudaStream_t stream) {
  const TensorArg& s = p.scores;
  if (s.ndim < 1 || !is_sparse_float(s.dtype))
    return make_status(StatusCode::kInvalidArgument, "[nm_mask] scores must be a float32, float16 or bfloat16 tensor with at least 1 dim");
  if (p.m < 2 || p.m > kNmMaxM || p.n <= 0 || p.n >= p.m)
    return make_status(StatusCode::kInvalidArgument, "[nm_mask] need 0 < n < m <= %lld", static_cast<long long>(kNmMaxM));
  const int64_t k = s.size(-1);
  if (k % p.m != 0)
    return make_status(StatusCode::kInvalidArgument, "[nm_mask] the last dim of scores must be a multiple of m");
  if (p.out.dtype != DType::Bool || p.out.numel() != s.numel() || !p.out.is_contiguous() || !err_ok(p.err))
    return make_status(StatusCode::kInvalidArgument, "[nm_mask] out must be a contiguous bool tensor shaped like scores, err int64 [1]");
  if (s.numel() == 0) return Status::Ok();
  const int64_t rows = s.rows();
  const cuda::Layout sl = cuda::Layout::of(s);
  const unsigned grid = grid_for(rows * k);
  const int n = static_cast<int>(p.n), m = static_cast<int>(p.m);
  auto* err = p.err.ptr<unsigned long long>();
  bool* out = p.out.ptr<bool>();
  switch (s.dtype) {
    case DType::F32: nm_mask_kernel<float><<<grid, kThreads, 0, stream>>>(s.ptr<const float>(), sl, rows, k, n, m, out, err); break;
    case DType::F16: nm_mask_kernel<__half><<<grid, kThreads, 0, stream>>>(s.ptr<const __half>(), sl, rows, k, n, m, out, err); break;
    default: nm_mask_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(s.ptr<const __nv_bfloat16>(), sl, rows, k, n, m, out, err);
  }
  return cuda::launch_status("nm_mask");
}

Status compress_24_cuda(const Compress24Params& p, cudaStream_t stream) {
  const TensorArg& w = p.w;
  if (w.ndim != 2 || !is_sparse_float(w.dtype))
    return make_status(StatusCode::kInvalidArgument, "[compress_24] w must be a 2-D float32, float16 or bfloat16 tensor");
  const int64_t R = w.shape[0], K = w.shape[1];
  if (K % 16 != 0) return make_status(StatusCode::kInvalidArgument, "[compress_24] the last dim of w must be a multiple of 16");
  if (p.values.dtype != w.dtype || p.values.ndim != 2 || p.values.shape[0] != R || p.values.shape[1] != K / 2 ||
      !p.values.is_contiguous() || p.meta.dtype != DType::I16 || p.meta.ndim != 2 || p.meta.shape[0] != R ||
      p.meta.shape[1] != K / 16 || !p.meta.is_contiguous() || !err_ok(p.err))
    return make_status(StatusCode::kInvalidArgument, "[compress_24] values must be contiguous [R, K/2] like w, meta contiguous int16 [R, K/16], err int64 [1]");
  const int64_t total = R * (K / 16);
  if (total == 0) return Status::Ok();
  auto* err = p.err.ptr<unsigned long long>();
  auto* meta = p.meta.ptr<uint16_t>();
  if (w.dtype == DType::F32)
    compress_24_kernel<float><<<grid_for(total), kThreads, 0, stream>>>(w.ptr<const float>(), w.strides[0], w.strides[1], R, K,
                                                                       p.values.ptr<float>(), meta, err);
  else
    compress_24_kernel<uint16_t><<<grid_for(total), kThreads, 0, stream>>>(w.ptr<const uint16_t>(), w.strides[0], w.strides[1], R,
                                                                          K, p.values.ptr<uint16_t>(), meta, err);
  return cuda::launch_status("compress_24");
}

Status decompress_24_cuda(const Decompress24Params& p, cudaStream_t stream) {
  const TensorArg& v = p.values;
  if (v.ndim != 2 || !is_sparse_float(v.dtype) || p.meta.ndim != 2 || p.meta.dtype != DType::I16)
    return make_status(StatusCode::kInvalidArgument, "[decompress_24] values must be 2-D float32/float16/bfloat16 and meta 2-D int16");
  const int64_t R = p.meta.shape[0], kw = p.meta.shape[1];
  if (v.shape[0] != R || v.shape[1] != 8 * kw)
    return make_status(StatusCode::kInvalidArgument, "[decompress_24] values [R, K/2] and meta [R, K/16] do not match");
  if (p.out.dtype != v.dtype || p.out.ndim != 2 || p.out.shape[0] != R || p.out.shape[1] != 16 * kw || !p.out.is_contiguous() ||
      !err_ok(p.err))
    return make_status(StatusCode::kInvalidArgument, "[decompress_24] out must be contiguous [R, K] like values, err int64 [1]");
  const int64_t total = R * kw;
  if (total == 0) return Status::Ok();
  auto* err = p.err.ptr<unsigned long long>();
  const auto* meta = p.meta.ptr<const uint16_t>();
  if (v.dtype == DType::F32)
    decompress_24_kernel<float><<<grid_for(total), kThreads, 0, stream>>>(v.ptr<const float>(), v.strides[0], v.strides[1], meta,
                                                                         p.meta.strides[0], p.meta.strides[1], R, kw,
                                                                         p.out.ptr<float>(), err);
  else
    decompress_24_kernel<uint16_t><<<grid_for(total), kThreads, 0, stream>>>(v.ptr<const uint16_t>(), v.strides[0], v.strides[1],
                                                                            meta, p.meta.strides[0], p.meta.strides[1], R, kw,
                                                                            p.out.ptr<uint16_t>(), err);
  return cuda::launch_status("decompress_24");
}

}  // namespace calibra
