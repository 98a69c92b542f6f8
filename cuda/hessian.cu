// calibra::hessian_accumulate on CUDA: H += X^T X, lower-triangle tiles only.
//
// One thread block per 64x64 tile (ti, tj) of H with ti >= tj (T(T+1)/2 blocks for T = ceil(d/64)).
// The block walks all N rows of X in steps of 16: both 16x64 slices of X (columns of tile ti and of
// tile tj) are converted to the compute type (fp32, or fp64 for a float64 H) into shared memory, and
// each of the 256 threads accumulates a 4x4 sub-tile with explicit FMAs (rows ty+16a, cols tx+16b, so
// shared-memory reads are broadcasts or consecutive). At the end the block adds its sums into the lower
// tile, stages the new values in shared memory and writes their transpose into the mirror tile, so H is
// exactly symmetric after this one launch (no second pass, no atomics, no allocation). Only H's lower
// triangle is read; its upper triangle is overwritten.
#include "calibra/params/hessian.h"
#include "common.cuh"

namespace calibra {
namespace {

constexpr int kTile = 64;
constexpr int kKStep = 16;
constexpr int kThreads = 256;
constexpr int kSub = 4;  // 4x4 outputs per thread

template <class T, class C>
__device__ __forceinline__ C load_as(const T* p) {
  if constexpr (std::is_same_v<T, double>) return static_cast<C>(*p);
  else return static_cast<C>(cuda::load_f32(p));
}

__device__ __forceinline__ float fma_c(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_c(double a, double b, double c) { return fma(a, b, c); }

template <class T, class C>
__global__ void __launch_bounds__(kThreads) hessian_tile_kernel(C* __restrict__ H, const T* __restrict__ x,
                                                                cuda::Layout xl, int64_t N, int64_t d,
                                                                bool merged, int64_t row_stride) {
  // Shared buffer: the two K slices during the sweep, then the 64x(64+1) staging tile.
  constexpr int kSliceElems = 2 * kKStep * kTile;
  constexpr int kStageElems = kTile * (kTile + 1);
  constexpr int kSmemElems = kSliceElems > kStageElems ? kSliceElems : kStageElems;
  __shared__ C smem[kSmemElems];
  C* As = smem;                   // [kKStep][kTile]: X[k, i0 + c]
  C* Bs = smem + kKStep * kTile;  // [kKStep][kTile]: X[k, j0 + c]

  // Tile (ti, tj), ti >= tj, from the linear block index t = ti (ti + 1) / 2 + tj.
  const int64_t t = blockIdx.x;
  int64_t ti = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (ti * (ti + 1) / 2 > t) --ti;
  while ((ti + 1) * (ti + 2) / 2 <= t) ++ti;
  const int64_t tj = t - ti * (ti + 1) / 2;
  const int64_t i0 = ti * kTile, j0 = tj * kTile;

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t cs = xl.strides[xl.ndim - 1];
  C acc[kSub][kSub];
#pragma unroll
  for (int a = 0; a < kSub; ++a)
#pragma unroll
    for (int b = 0; b < kSub; ++b) acc[a][b] = C(0);

  for (int64_t k0 = 0; k0 < N; k0 += kKStep) {
    for (int e = threadIdx.x; e < kKStep * kTile; e += kThreads) {
      const int kk = e / kTile, c = e % kTile;
      const int64_t n = k0 + kk;
      C va = C(0), vb = C(0);
      if (n < N) {
        const T* row = x + (merged ? n * row_stride : xl.row_offset(n));
        if (i0 + c < d) va = load_as<T, C>(row + (i0 + c) * cs);
        if (j0 + c < d) vb = load_as<T, C>(row + (j0 + c) * cs);
      }
      As[e] = va;
      Bs[e] = vb;
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kKStep; ++kk) {
      C av[kSub], bv[kSub];
#pragma unroll
      for (int a = 0; a < kSub; ++a) av[a] = As[kk * kTile + ty + 16 * a];
#pragma unroll
      for (int b = 0; b < kSub; ++b) bv[b] = Bs[kk * kTile + tx + 16 * b];
#pragma unroll
      for (int a = 0; a < kSub; ++a)
#pragma unroll
        for (int b = 0; b < kSub; ++b) acc[a][b] = fma_c(av[a], bv[b], acc[a][b]);
    }
    __syncthreads();
  }

  // Lower tile: H[i][j] += acc (i >= j on the diagonal tile), staged for the mirror.
  C* stage = smem;  // [kTile][kTile + 1], indexed [i - i0][j - j0]
#pragma unroll
  for (int a = 0; a < kSub; ++a) {
    const int li = ty + 16 * a;
    const int64_t i = i0 + li;
#pragma unroll
    for (int b = 0; b < kSub; ++b) {
      const int lj = tx + 16 * b;
      const int64_t j = j0 + lj;
      if (i < d && j < d && i >= j) {
        const C v = H[i * d + j] + acc[a][b];
        H[i * d + j] = v;
        stage[li * (kTile + 1) + lj] = v;
      }
    }
  }
  __syncthreads();
  // Mirror: H[j][i] = new H[i][j] for i > j, written row by row of the upper tile (coalesced in i).
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int lj = e / kTile, li = e % kTile;
    const int64_t i = i0 + li, j = j0 + lj;
    if (i < d && j < d && i > j) H[j * d + i] = stage[li * (kTile + 1) + lj];
  }
}

}  // namespace

Status hessian_accumulate_cuda(const HessianParams& p, cudaStream_t stream) {
  const char* op = "[hessian_accumulate]";
  if (p.x.ndim < 1) return make_status(StatusCode::kInvalidArgument, "%s x must have at least 1 dims", op);
  const int64_t d = p.x.size(-1);
  if (p.H.ndim != 2 || p.H.shape[0] != d || p.H.shape[1] != d)
    return make_status(StatusCode::kInvalidArgument, "%s H must be [d, d] with d = x.shape[-1] = %lld", op,
                       static_cast<long long>(d));
  if (!p.H.is_contiguous()) return make_status(StatusCode::kInvalidArgument, "%s H must be contiguous", op);
  if (p.H.dtype != DType::F32 && p.H.dtype != DType::F64)
    return make_status(StatusCode::kInvalidArgument, "%s H must be float32 or float64, got %s", op,
                       dtype_name(p.H.dtype));
  const int64_t N = p.x.rows();
  if (N == 0 || d == 0) return Status::Ok();
  const int64_t tiles = cuda::ceil_div(d, kTile);
  const int64_t blocks = tiles * (tiles + 1) / 2;
  if (blocks > 0x7fffffffLL)
    return make_status(StatusCode::kUnsupported, "%s d = %lld is too large for the CUDA kernel", op,
                       static_cast<long long>(d));
  const cuda::Layout xl = cuda::Layout::of(p.x);
  const bool merged = p.x.leading_dims_mergeable();
  const int64_t rs = p.x.row_stride();
  bool ok = cuda::dispatch_floating(p.x.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.H.dtype == DType::F32)
      hessian_tile_kernel<T, float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          p.H.ptr<float>(), p.x.ptr<const T>(), xl, N, d, merged, rs);
    else
      hessian_tile_kernel<T, double><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          p.H.ptr<double>(), p.x.ptr<const T>(), xl, N, d, merged, rs);
  });
  if (!ok)
    return make_status(StatusCode::kInvalidArgument, "%s x must be floating point, got %s", op, dtype_name(p.x.dtype));
  return cuda::launch_status("hessian_accumulate");
}

}  // namespace calibra
