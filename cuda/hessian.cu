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
//
// fp16/bf16 x with a float32 H (the usual GPU case: a half-precision model) runs on tensor cores
// instead (hessian_mma_kernel): same tiles and epilogue, 4 warps per 64x64 tile, each warp a 32x32
// quarter as 2x4 mma.m16n8k16 tiles with fp32 accumulators, 32 tokens per shared-memory step. The
// products of two 16-bit floats are exact in fp32, so only the accumulation order differs from the FMA
// kernel. The K slices are stored transposed in shared memory ([channel][token], tokens contiguous),
// which is exactly the row-major A (= X^T) and column-major B (= X) fragment order of the mma: each
// fragment register is one aligned 32-bit load of two consecutive tokens.
#include "calibra/params/hessian.h"
#include "common.cuh"
#include "gemm_common.cuh"

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

// Origin (i0, j0) of this block's 64x64 lower tile (ti, tj), ti >= tj, from the linear block index
// t = ti (ti + 1) / 2 + tj.
__device__ __forceinline__ void lower_tile_origin(int64_t& i0, int64_t& j0) {
  const int64_t t = blockIdx.x;
  int64_t ti = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (ti * (ti + 1) / 2 > t) --ti;
  while ((ti + 1) * (ti + 2) / 2 <= t) ++ti;
  const int64_t tj = t - ti * (ti + 1) / 2;
  i0 = ti * kTile;
  j0 = tj * kTile;
}

// Mirror the tile's new lower values (staged [li][lj] with pitch kTile + 1, after a __syncthreads) onto
// the upper triangle: H[j][i] = H[i][j] for i > j, written row by row of the upper tile (coalesced in i).
template <int kBlockThreads, class C>
__device__ __forceinline__ void mirror_tile(C* __restrict__ H, const C* stage, int64_t i0, int64_t j0, int64_t d) {
  for (int e = threadIdx.x; e < kTile * kTile; e += kBlockThreads) {
    const int lj = e / kTile, li = e % kTile;
    const int64_t i = i0 + li, j = j0 + lj;
    if (i < d && j < d && i > j) H[j * d + i] = stage[li * (kTile + 1) + lj];
  }
}
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

  int64_t i0, j0;
  lower_tile_origin(i0, j0);

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
  mirror_tile<kThreads>(H, stage, i0, j0, d);
}

// ---- tensor cores: fp16/bf16 x, fp32 H -------------------------------------------------------------
constexpr int kMmaThreads = 128;  // 4 warps: 2 x 2 quarters of the 64x64 tile
constexpr int kMmaK = 32;         // tokens per shared-memory step
constexpr int kMmaPitch = kMmaK + 8;  // b16 elements per smem row; +8 keeps rows 16-byte aligned, spreads banks

// The raw 16 bits of x[offset] (tokens past N and channels past d are 0, which adds nothing).
template <class T>
__device__ __forceinline__ uint16_t load_bits(const T* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}

template <class T>
__global__ void __launch_bounds__(kMmaThreads) hessian_mma_kernel(float* __restrict__ H, const T* __restrict__ x,
                                                                  cuda::Layout xl, int64_t N, int64_t d,
                                                                  bool merged, int64_t row_stride) {
  // [channel][token] slices of the two column tiles; reused as the 64x65 fp32 staging tile at the end.
  constexpr int kSliceBytes = 2 * kTile * kMmaPitch * 2;
  constexpr int kStageBytes = kTile * (kTile + 1) * 4;
  __shared__ __align__(16) unsigned char smem_raw[kSliceBytes > kStageBytes ? kSliceBytes : kStageBytes];
  uint16_t* As = reinterpret_cast<uint16_t*>(smem_raw);  // As[c * kMmaPitch + k] = X[k0 + k, i0 + c]
  uint16_t* Bs = As + kTile * kMmaPitch;                  // Bs[c * kMmaPitch + k] = X[k0 + k, j0 + c]

  int64_t i0, j0;
  lower_tile_origin(i0, j0);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, q = lane % 4;  // mma groupID and thread-in-group
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // this warp's quarter: rows wm.., cols wn..
  const int64_t cs = xl.strides[xl.ndim - 1];
  float acc[2][4][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[a][b][r] = 0.0f;

  for (int64_t k0 = 0; k0 < N; k0 += kMmaK) {
    // Global reads run along channels (coalesced); the stores transpose into [channel][token].
    for (int e = threadIdx.x; e < kMmaK * kTile; e += kMmaThreads) {
      const int kk = e / kTile, c = e % kTile;
      const int64_t n = k0 + kk;
      uint16_t va = 0, vb = 0;
      if (n < N) {
        const T* row = x + (merged ? n * row_stride : xl.row_offset(n));
        if (i0 + c < d) va = load_bits(row + (i0 + c) * cs);
        if (j0 + c < d) vb = load_bits(row + (j0 + c) * cs);
      }
      As[c * kMmaPitch + kk] = va;
      Bs[c * kMmaPitch + kk] = vb;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMmaK; kk += 16) {
      // A (16x16, row-major) = X^T rows wm + 16 mi .. : a[0] (row g, k 2q..2q+1), a[1] (row g+8),
      // a[2] (row g, k +8), a[3] (row g+8, k +8). B (16x8, col-major) = X: b0 (k 2q..2q+1, col g), b1 (k +8).
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const uint16_t* r0 = As + (wm + 16 * mi + g) * kMmaPitch + kk + 2 * q;
        const uint16_t* r8 = r0 + 8 * kMmaPitch;
        af[mi][0] = *reinterpret_cast<const uint32_t*>(r0);
        af[mi][1] = *reinterpret_cast<const uint32_t*>(r8);
        af[mi][2] = *reinterpret_cast<const uint32_t*>(r0 + 8);
        af[mi][3] = *reinterpret_cast<const uint32_t*>(r8 + 8);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const uint16_t* c0 = Bs + (wn + 8 * ni + g) * kMmaPitch + kk + 2 * q;
        bf[ni][0] = *reinterpret_cast<const uint32_t*>(c0);
        bf[ni][1] = *reinterpret_cast<const uint32_t*>(c0 + 8);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) gemm::mma_16816<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
    __syncthreads();
  }

  // D fragment: acc[.][.][0..1] at (row g, cols 2q, 2q+1), [2..3] at row g+8. Stage the new lower
  // values, then mirror, as the FMA kernel does.
  float* stage = reinterpret_cast<float*>(smem_raw);  // [kTile][kTile + 1]
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int li = wm + 16 * mi + g + 8 * (r / 2), lj = wn + 8 * ni + 2 * q + (r % 2);
        const int64_t i = i0 + li, j = j0 + lj;
        if (i < d && j < d && i >= j) {
          const float v = H[i * d + j] + acc[mi][ni][r];
          H[i * d + j] = v;
          stage[li * (kTile + 1) + lj] = v;
        }
      }
  __syncthreads();
  mirror_tile<kMmaThreads>(H, stage, i0, j0, d);
}

}  // namespace

Status hessian_accumulate_cuda(const HessianParams& p, cudaStream_t stream) {
  const char* op = "[hessian_accumulate]";
  CALIBRA_RETURN_IF_ERROR(check_hessian_accumulate(p));
  const int64_t d = p.x.size(-1);
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
    constexpr bool k16 = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;
    if constexpr (k16) {
      if (p.H.dtype == DType::F32) {  // tensor cores
        hessian_mma_kernel<T><<<static_cast<unsigned>(blocks), kMmaThreads, 0, stream>>>(
            p.H.ptr<float>(), p.x.ptr<const T>(), xl, N, d, merged, rs);
        return;
      }
    }
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
