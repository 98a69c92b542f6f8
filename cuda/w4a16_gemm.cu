// calibra::w4a16_gemm on CUDA: y[M, N] = x[M, K] * dequant(W)[N, K]^T, int4 weights in the W4A16 tile
// layout (params/gemm.h), fp16/bf16 activations, fp32 accumulation on tensor cores (mma.sync m16n8k16).
//
// Design (after Marlin, Frantar et al. 2024; written from its description, not its code):
// - A thread block of 4 warps owns 256 outputs (64 per warp) x (16 * MB) rows of x, and a slice of K
//   (split-K when the (M, N) tiles alone cannot fill the GPU; partial sums go to a Python-allocated fp32
//   workspace, reduced afterwards in a fixed order).
// - K advances in tiles of 64 through a 4-stage cp.async pipeline: x rows, weight words and the
//   scale/zero rows of the tile are copied global -> shared asynchronously, 3 tiles ahead of the math,
//   so the weight stream (the bottleneck at batch 1..32) never waits on the tensor cores.
// - Weights stay 4-bit until they reach registers: one 16-byte shared load per lane brings 32 codes,
//   already in mma B-fragment order (that is what the repack did). Each nibble pair becomes a half2 by
//   OR-ing it into the mantissa of a magic constant (1024 for fp16, 128 for bf16), then
//   (magic + q) - (magic + z) = q - z exactly, times the scale: one rounding, bit-identical to
//   calibra.ops.dequantize in the activation dtype.
// - x fragments come from shared memory by ldmatrix.x4 from an XOR-swizzled tile (conflict-free).
// - Rows past M are zero-filled by cp.async (src-size 0) and never stored: batch 1..128 without a
//   separate tail path. M > 64 uses more blocks along y.
#include "calibra/params/gemm.h"
#include "gemm_common.cuh"

namespace calibra {
namespace {

using gemm::Act;

constexpr int kThreads = 128;
constexpr int kWarpN = 64;
constexpr int kBlockN = 4 * kWarpN;
constexpr int kBlockK = 64;
static_assert(kBlockN == kW4A16BlockN, "params/gemm.h states this kernel's block width (the split-K rule uses it)");
constexpr int kStages = 4;
constexpr int kBBytes = (kBlockK / 16) * 2 * kBlockN * 4;  // 4 rows of the tile layout, 512 words each
constexpr int kSBytes = 4 * kBlockN * 2;                   // up to 4 scale rows (group 16) of 256 halves

template <int MB>
constexpr int stage_bytes() { return 16 * MB * kBlockK * 2 + kBBytes + 2 * kSBytes; }

template <class T>
__device__ __forceinline__ typename Act<T>::T2 pair(float v);
template <>
__device__ __forceinline__ __half2 pair<__half>(float v) { return __float2half2_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat162 pair<__nv_bfloat16>(float v) { return __float2bfloat162_rn(v); }

template <class T, int MB>
__global__ void __launch_bounds__(kThreads, 1)
w4a16_gemm_kernel(const T* __restrict__ x, const uint4* __restrict__ tiled, const T* __restrict__ scales,
                  const T* __restrict__ zeros, T* __restrict__ out, float* __restrict__ ws, int M, int N, int K,
                  int group, int tiles_per_split) {
  using T2 = typename Act<T>::T2;
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kRows = 16 * MB;
  constexpr int kABytes = kRows * kBlockK * 2;
  constexpr int kStage = stage_bytes<MB>();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * kBlockN, m0 = blockIdx.y * kRows;
  const int k_tiles = K / kBlockK;
  const int kt_begin = blockIdx.z * tiles_per_split;
  const int n_iters = max(0, min(k_tiles, kt_begin + tiles_per_split) - kt_begin);
  const int gmin = min(group, kBlockK);  // a stage holds kBlockK / gmin scale rows
  const bool warp_active = n0 + warp * kWarpN < N;

  auto load_stage = [&](int slot, int kt) {
    unsigned char* st = smem + slot * kStage;
    T* As = reinterpret_cast<T*>(st);
    uint32_t* Bs = reinterpret_cast<uint32_t*>(st + kABytes);
    T* Ss = reinterpret_cast<T*>(st + kABytes + kBBytes);
    T* Zs = reinterpret_cast<T*>(st + kABytes + kBBytes + kSBytes);
    const int k0 = kt * kBlockK;
    for (int c = threadIdx.x; c < kRows * 8; c += kThreads) {  // x: kRows x 8 chunks of 8 halves
      const int r = c / 8, q = c % 8, m = m0 + r;
      const T* src = x + static_cast<int64_t>(min(m, M - 1)) * K + k0 + q * 8;
      gemm::cp_async16(As + gemm::swz128(r, q) * 8, src, m < M ? 16 : 0);
    }
    for (int c = threadIdx.x; c < 4 * 128; c += kThreads) {  // weights: 4 rows x 128 chunks of 4 words
      const int r = c / 128, q = c % 128;
      const bool ok = n0 + (q / 32) * kWarpN < N;
      const uint4* src = tiled + (static_cast<int64_t>(kt * 4 + r) * 2 * N + 2 * n0) / 4 + q;
      gemm::cp_async16(Bs + r * 512 + q * 4, ok ? src : tiled, ok ? 16 : 0);
    }
    for (int c = threadIdx.x; c < (kBlockK / gmin) * 32; c += kThreads) {  // scale (+zero) rows: 32 chunks each
      const int r = c / 32, q = c % 32, n = n0 + q * 8;
      const bool ok = n < N;
      const int64_t off = static_cast<int64_t>((k0 + r * gmin) / group) * N + n;
      gemm::cp_async16(Ss + r * kBlockN + q * 8, ok ? scales + off : scales, ok ? 16 : 0);
      if (zeros != nullptr) gemm::cp_async16(Zs + r * kBlockN + q * 8, ok ? zeros + off : zeros, ok ? 16 : 0);
    }
  };

  float acc[MB][8][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mb][nb][i] = 0.0f;

  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_iters) load_stage(s, kt_begin + s);
    gemm::cp_async_commit();
  }
  const float magic = Act<T>::magic();
  const int g = lane / 4;
  for (int it = 0; it < n_iters; ++it) {
    // Tile `it` has landed once at most kStages-2 newer groups are pending; the barrier also tells every
    // warp that the slot refilled below (computed in iteration it-1) is no longer being read.
    gemm::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < n_iters) load_stage((it + kStages - 1) % kStages, kt_begin + it + kStages - 1);
    gemm::cp_async_commit();
    if (!warp_active) continue;

    const unsigned char* st = smem + (it % kStages) * kStage;
    const T* As = reinterpret_cast<const T*>(st);
    const uint4* Bs = reinterpret_cast<const uint4*>(st + kABytes);
    const T* Ss = reinterpret_cast<const T*>(st + kABytes + kBBytes);
    const T* Zs = reinterpret_cast<const T*>(st + kABytes + kBBytes + kSBytes);
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      uint32_t a[MB][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)  // lanes 0-15: rows 0-15 at k 0-7, lanes 16-31: k 8-15 (A fragment order)
        gemm::ldmatrix_x4(a[mb], As + gemm::swz128(mb * 16 + (lane & 15), 2 * kk + (lane >> 4)) * 8);
      const uint4 wq = Bs[kk * 128 + warp * 32 + lane];
      const uint32_t words[4] = {wq.x, wq.y, wq.z, wq.w};
      const int srow = (16 * kk) / gmin;
      const T* s_lane = Ss + srow * kBlockN + warp * kWarpN + g;
      const T* z_lane = Zs + srow * kBlockN + warp * kWarpN + g;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // This lane's outputs in sub-tile j: column g (n8 block 2j) and g + 8 (n8 block 2j+1).
        const T2 s_lo = pair<T>(cuda::load_f32(s_lane + 16 * j)), s_hi = pair<T>(cuda::load_f32(s_lane + 16 * j + 8));
        const float z_lo = zeros != nullptr ? cuda::load_f32(z_lane + 16 * j) : 8.0f;
        const float z_hi = zeros != nullptr ? cuda::load_f32(z_lane + 16 * j + 8) : 8.0f;
        const T2 mz_lo = pair<T>(magic + z_lo), mz_hi = pair<T>(magic + z_hi);  // exact: small integers
        uint32_t b[4];
#pragma unroll
        for (int pa = 0; pa < 4; ++pa) {  // nibbles pa (low half) and pa + 4 (high half): one B register
          const uint32_t raw = ((words[j] >> (4 * pa)) & 0x000F000Fu) | Act<T>::kMagic2;
          T2 v = __hsub2(gemm::as_t2<T2>(raw), pa < 2 ? mz_lo : mz_hi);
          v = __hmul2(v, pa < 2 ? s_lo : s_hi);
          b[pa] = gemm::as_u32(v);
        }
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          gemm::mma_16816<T>(acc[mb][2 * j], a[mb], b[0], b[1]);
          gemm::mma_16816<T>(acc[mb][2 * j + 1], a[mb], b[2], b[3]);
        }
      }
    }
  }
  gemm::cp_async_wait<0>();
  if (!warp_active) return;

  // Accumulator fragment: c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g + 8, same cols).
  const int t = lane % 4;
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + mb * 16 + g + 8 * h;
        const int n = n0 + warp * kWarpN + nb * 8 + 2 * t;
        if (m >= M) continue;
        const float v0 = acc[mb][nb][2 * h], v1 = acc[mb][nb][2 * h + 1];
        if (ws != nullptr) {
          *reinterpret_cast<float2*>(ws + (static_cast<int64_t>(blockIdx.z) * M + m) * N + n) = make_float2(v0, v1);
        } else {
          T2 v;
          v.x = cuda::store_f32<T>(v0);
          v.y = cuda::store_f32<T>(v1);
          *reinterpret_cast<T2*>(out + static_cast<int64_t>(m) * N + n) = v;
        }
      }
}

template <class T, int MB>
Status launch(const W4A16GemmParams& p, int M, int N, int K, int group, int splits, cudaStream_t stream) {
  constexpr int smem = kStages * stage_bytes<MB>();
  auto kernel = w4a16_gemm_kernel<T, MB>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return cuda::launch_status("w4a16_gemm");
  const int k_tiles = K / kBlockK;
  const int per = static_cast<int>(gemm::tiles_per_split(k_tiles, splits));
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(N, kBlockN)), static_cast<unsigned>(cuda::ceil_div(M, 16 * MB)),
                  static_cast<unsigned>(splits));
  if (grid.y > 65535u) return make_status(StatusCode::kUnsupported, "[w4a16_gemm] too many rows (%d)", M);
  float* ws = splits > 1 ? p.workspace.ptr<float>() : nullptr;
  kernel<<<grid, kThreads, smem, stream>>>(p.x.ptr<const T>(), p.tiled.ptr<const uint4>(), p.scales.ptr<const T>(),
                                           p.zeros.data ? p.zeros.ptr<const T>() : nullptr, p.out.ptr<T>(), ws, M, N, K,
                                           group, per);
  CALIBRA_RETURN_IF_ERROR(cuda::launch_status("w4a16_gemm"));
  if (splits > 1) return gemm::splitk_reduce(ws, splits, M, N, p.x.dtype, p.out.data, stream);
  return Status::Ok();
}

template <class T>
Status dispatch_m(const W4A16GemmParams& p, int M, int N, int K, int group, int splits, cudaStream_t stream) {
  if (M <= 16) return launch<T, 1>(p, M, N, K, group, splits, stream);
  if (M <= 32) return launch<T, 2>(p, M, N, K, group, splits, stream);
  return launch<T, 4>(p, M, N, K, group, splits, stream);
}

bool aligned16(const TensorArg& t) { return reinterpret_cast<uintptr_t>(t.data) % 16 == 0; }

}  // namespace

Status w4a16_gemm_cuda(const W4A16GemmParams& p, cudaStream_t stream) {
  const TensorArg& x = p.x;
  if ((x.dtype != DType::F16 && x.dtype != DType::BF16) || x.ndim < 1 || !x.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[w4a16_gemm] x must be contiguous float16 or bfloat16");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  const int64_t N = p.tiled.ndim == 2 ? p.tiled.shape[1] / 2 : 0;
  const int64_t group = p.group == -1 ? K : p.group;
  if (p.tiled.dtype != DType::I32 || p.tiled.ndim != 2 || p.tiled.shape[0] * 16 != K || N % 64 != 0 || !p.tiled.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[w4a16_gemm] tiled must be contiguous int32 [K/16, 2N] with N %% 64 == 0");
  if (K % kBlockK != 0 || group <= 0 || K % group != 0 || !(group == 16 || group == 32 || group % 64 == 0))
    return make_status(StatusCode::kInvalidArgument, "[w4a16_gemm] need K %% 64 == 0 and a group of 16, 32 or a multiple of 64 dividing K");
  const int64_t G = K / group;
  if (p.scales.dtype != x.dtype || p.scales.numel() != G * N || !p.scales.is_contiguous() ||
      (p.zeros.data && (p.zeros.dtype != x.dtype || p.zeros.numel() != G * N || !p.zeros.is_contiguous())))
    return make_status(StatusCode::kInvalidArgument, "[w4a16_gemm] scales/zeros must be contiguous [G, N] in x's dtype");
  if (p.out.dtype != x.dtype || p.out.numel() != M * N || !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[w4a16_gemm] out must be contiguous [M, N] in x's dtype");
  int64_t splits = 1;
  if (p.workspace.data != nullptr) {
    splits = p.workspace.ndim == 3 ? p.workspace.shape[0] : 0;
    if (p.workspace.dtype != DType::F32 || splits < 1 || p.workspace.shape[1] != M || p.workspace.shape[2] != N ||
        !p.workspace.is_contiguous() || splits > K / kBlockK)
      return make_status(StatusCode::kInvalidArgument, "[w4a16_gemm] workspace must be contiguous float32 [S, M, N], 1 <= S <= K/64");
  }
  if (!aligned16(x) || !aligned16(p.tiled) || !aligned16(p.scales) || (p.zeros.data && !aligned16(p.zeros)))
    return make_status(StatusCode::kInvalidArgument, "[w4a16_gemm] x, tiled, scales and zeros must be 16-byte aligned");
  if (M > INT32_MAX / 2 || N > INT32_MAX / 4 || K > INT32_MAX / 2)
    return make_status(StatusCode::kUnsupported, "[w4a16_gemm] a dimension is too large");
  if (M == 0 || N == 0) return Status::Ok();
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K), gs = static_cast<int>(group);
  const int s = static_cast<int>(splits);
  if (x.dtype == DType::F16) return dispatch_m<__half>(p, m, n, k, gs, s, stream);
  return dispatch_m<__nv_bfloat16>(p, m, n, k, gs, s, stream);
}

}  // namespace calibra
