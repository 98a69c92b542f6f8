// calibra::sparse24_gemm on CUDA: y[M, N] = x[M, K] * W[N, K]^T for a 2:4-sparse W on sparse tensor
// cores (mma.sp::ordered_metadata m16n8k32, fp16/bf16 in, fp32 accumulation; Ampere PTX that Hopper
// also runs).
//
// mma.sp only sparsifies its A operand, so the kernel computes y^T = W x^T: W's rows (outputs) are the
// mma M dimension, the batch is the mma N dimension (8 per instruction, so batch 1 wastes 7/8 of an
// 8-wide tile instead of 15/16 of a 16-wide one), and x rows are the "col" B operand as they are.
// - A thread block of 4 warps owns 128 outputs (2 x 16-row tiles per warp) x (8 * MB8) batch rows and a
//   K slice (split-K as in w4a16_gemm.cu, Python-allocated fp32 workspace).
// - K advances by 64 (two mma.sp k32 steps) through a 4-stage cp.async pipeline carrying the kept values
//   (compress_24's [N, K/2], 64 bytes per row per tile), the reordered metadata (params/gemm.h: one
//   32-bit word per lane per mma) and x rows.
// - The A fragment of mma.sp m16n8k32 over the compressed 16x16 values is the dense m16n8k16 A fragment
//   (PTX: lane 4g+t holds kept values of chunk t and t+4 of rows g and g+8), so ldmatrix.x4 loads it from
//   row-major values; B (x) fragments are ldmatrix.x4 of 8 batch rows x 32 k.
// - Shared tiles are XOR-swizzled so every ldmatrix phase touches 8 distinct 16-byte bank groups.
#include "calibra/params/gemm.h"
#include "gemm_common.cuh"

namespace calibra {
namespace {

using gemm::Act;

constexpr int kThreads = 128;
constexpr int kWarpRows = 32;
constexpr int kBlockN = 4 * kWarpRows;
constexpr int kBlockK = 64;
static_assert(kBlockN == kSparse24BlockN, "params/gemm.h states this kernel's block width (the split-K rule uses it)");
constexpr int kStages = 4;
constexpr int kVBytes = kBlockN * (kBlockK / 2) * 2;        // kept values: 128 rows x 32 halves
constexpr int kMBytes = (kBlockN / 16) * 2 * 16 * 4;        // metadata: 8 row tiles x 2 k32 steps x 16 words

template <int MB8>
constexpr int stage_bytes() { return kVBytes + kMBytes + 8 * MB8 * kBlockK * 2; }

// Values rows are 64 bytes (4 chunks): XOR the chunk with bits 1..2 of the row, so the 8 rows of one
// ldmatrix phase (4 even, 4 odd) land in 8 different 16-byte slots of the 128-byte bank window.
__device__ __forceinline__ int swz64(int row, int chunk) { return row * 4 + (chunk ^ ((row >> 1) & 3)); }

template <class T, int MB8>
__global__ void __launch_bounds__(kThreads, 1)
sparse24_gemm_kernel(const T* __restrict__ x, const T* __restrict__ values, const uint32_t* __restrict__ meta,
                     T* __restrict__ out, float* __restrict__ ws, int M, int N, int K, int tiles_per_split) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kRows = 8 * MB8;
  constexpr int kStage = stage_bytes<MB8>();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * kBlockN, m0 = blockIdx.y * kRows;
  const int k_tiles = K / kBlockK;
  const int kt_begin = blockIdx.z * tiles_per_split;
  const int n_iters = max(0, min(k_tiles, kt_begin + tiles_per_split) - kt_begin);
  const int half_k = K / 2;

  auto load_stage = [&](int slot, int kt) {
    unsigned char* st = smem + slot * kStage;
    T* Vs = reinterpret_cast<T*>(st);
    uint32_t* Ms = reinterpret_cast<uint32_t*>(st + kVBytes);
    T* Xs = reinterpret_cast<T*>(st + kVBytes + kMBytes);
    for (int c = threadIdx.x; c < kBlockN * 4; c += kThreads) {  // values: 128 rows x 4 chunks
      const int r = c / 4, q = c % 4, n = n0 + r;
      const T* src = values + static_cast<int64_t>(min(n, N - 1)) * half_k + kt * (kBlockK / 2) + q * 8;
      gemm::cp_async16(Vs + swz64(r, q) * 8, src, n < N ? 16 : 0);
    }
    for (int c = threadIdx.x; c < (kBlockN / 16) * 8; c += kThreads) {  // metadata: 8 row tiles x 8 chunks
      const int rt = c / 8, q = c % 8;
      const int rtg = n0 / 16 + rt;
      if (rtg * 16 < N) {
        gemm::cp_async16(Ms + rt * 32 + q * 4, meta + static_cast<int64_t>(rtg) * half_k + kt * 32 + q * 4, 16);
      } else {
        // A row tile past N (the block's last, partial 128 rows): its values are zero-filled, and its
        // metadata must still be a valid ordered pair per group -- zeros would name index 0 twice, which
        // mma.sp::ordered_metadata does not define. 0x4 per group (indices 0, 1), as Sparse24Linear's
        // empty matrix; plain shared stores, visible after the __syncthreads before the tile is read.
        for (int w = 0; w < 4; ++w) Ms[rt * 32 + q * 4 + w] = 0x44444444u;
      }
    }
    for (int c = threadIdx.x; c < kRows * 8; c += kThreads) {  // x: kRows x 8 chunks
      const int r = c / 8, q = c % 8, m = m0 + r;
      const T* src = x + static_cast<int64_t>(min(m, M - 1)) * K + kt * kBlockK + q * 8;
      gemm::cp_async16(Xs + gemm::swz128(r, q) * 8, src, m < M ? 16 : 0);
    }
  };

  float acc[2][MB8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int mb = 0; mb < MB8; ++mb)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][mb][v] = 0.0f;

  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_iters) load_stage(s, kt_begin + s);
    gemm::cp_async_commit();
  }
  for (int it = 0; it < n_iters; ++it) {
    gemm::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < n_iters) load_stage((it + kStages - 1) % kStages, kt_begin + it + kStages - 1);
    gemm::cp_async_commit();

    const unsigned char* st = smem + (it % kStages) * kStage;
    const T* Vs = reinterpret_cast<const T*>(st);
    const uint32_t* Ms = reinterpret_cast<const uint32_t*>(st + kVBytes);
    const T* Xs = reinterpret_cast<const T*>(st + kVBytes + kMBytes);
#pragma unroll
    for (int kq = 0; kq < 2; ++kq) {
      uint32_t a[2][4], e[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = warp * kWarpRows + i * 16 + (lane & 15);
        gemm::ldmatrix_x4(a[i], Vs + swz64(row, 2 * kq + (lane >> 4)) * 8);
        // Lanes 4g and 4g+1 supply the metadata (selector 0): word 2g + h of this tile's k32 group. Lanes
        // 4g+2, 4g+3 load a harmless duplicate.
        e[i] = Ms[(warp * 2 + i) * 32 + kq * 16 + (lane / 4) * 2 + (lane & 1)];
      }
#pragma unroll
      for (int mb = 0; mb < MB8; ++mb) {
        uint32_t b[4];  // register j: batch row lane/4, k = 8j + 2(lane%4), +1 of this k32 step
        gemm::ldmatrix_x4(b, Xs + gemm::swz128(mb * 8 + (lane & 7), 4 * kq + (lane >> 3)) * 8);
#pragma unroll
        for (int i = 0; i < 2; ++i) gemm::mma_sp_16832<T>(acc[i][mb], a[i], b, e[i]);
      }
    }
  }
  gemm::cp_async_wait<0>();

  // Accumulators of y^T: c0, c1 = (output row g, batch cols 2t, 2t+1), c2, c3 = (output row g + 8, same).
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tile = n0 + warp * kWarpRows + i * 16;
    if (tile >= N) continue;
#pragma unroll
    for (int mb = 0; mb < MB8; ++mb)
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int n = tile + g + 8 * (v >> 1);
        const int m = m0 + mb * 8 + 2 * t + (v & 1);
        if (m >= M) continue;
        if (ws != nullptr) ws[(static_cast<int64_t>(blockIdx.z) * M + m) * N + n] = acc[i][mb][v];
        else out[static_cast<int64_t>(m) * N + n] = cuda::store_f32<T>(acc[i][mb][v]);
      }
  }
}

template <class T, int MB8>
Status launch(const Sparse24GemmParams& p, int M, int N, int K, int splits, cudaStream_t stream) {
  constexpr int smem = kStages * stage_bytes<MB8>();
  auto kernel = sparse24_gemm_kernel<T, MB8>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return cuda::launch_status("sparse24_gemm");
  const int per = static_cast<int>(gemm::tiles_per_split(K / kBlockK, splits));
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(N, kBlockN)), static_cast<unsigned>(cuda::ceil_div(M, 8 * MB8)),
                  static_cast<unsigned>(splits));
  if (grid.y > 65535u) return make_status(StatusCode::kUnsupported, "[sparse24_gemm] too many rows (%d)", M);
  float* ws = splits > 1 ? p.workspace.ptr<float>() : nullptr;
  kernel<<<grid, kThreads, smem, stream>>>(p.x.ptr<const T>(), p.values.ptr<const T>(), p.meta.ptr<const uint32_t>(),
                                           p.out.ptr<T>(), ws, M, N, K, per);
  CALIBRA_RETURN_IF_ERROR(cuda::launch_status("sparse24_gemm"));
  if (splits > 1) return gemm::splitk_reduce(ws, splits, M, N, p.x.dtype, p.out.data, stream);
  return Status::Ok();
}

template <class T>
Status dispatch_m(const Sparse24GemmParams& p, int M, int N, int K, int splits, cudaStream_t stream) {
  if (M <= 8) return launch<T, 1>(p, M, N, K, splits, stream);
  if (M <= 16) return launch<T, 2>(p, M, N, K, splits, stream);
  if (M <= 32) return launch<T, 4>(p, M, N, K, splits, stream);
  return launch<T, 8>(p, M, N, K, splits, stream);
}

bool aligned16(const TensorArg& t) { return reinterpret_cast<uintptr_t>(t.data) % 16 == 0; }

}  // namespace

Status sparse24_gemm_cuda(const Sparse24GemmParams& p, cudaStream_t stream) {
  const TensorArg& x = p.x;
  if ((x.dtype != DType::F16 && x.dtype != DType::BF16) || x.ndim < 1 || !x.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[sparse24_gemm] x must be contiguous float16 or bfloat16");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  const int64_t N = p.values.ndim == 2 ? p.values.shape[0] : 0;
  if (K % kBlockK != 0 || p.values.dtype != x.dtype || p.values.ndim != 2 || p.values.shape[1] * 2 != K || N % 16 != 0 ||
      !p.values.is_contiguous() || p.meta.dtype != DType::I32 || p.meta.ndim != 2 || p.meta.shape[0] != N / 16 ||
      p.meta.shape[1] != K / 2 || !p.meta.is_contiguous())
    return make_status(StatusCode::kInvalidArgument,
                       "[sparse24_gemm] need K %% 64 == 0, values contiguous [N, K/2] like x (N %% 16 == 0), meta contiguous int32 [N/16, K/2]");
  if (p.out.dtype != x.dtype || p.out.numel() != M * N || !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[sparse24_gemm] out must be contiguous [M, N] in x's dtype");
  int64_t splits = 1;
  if (p.workspace.data != nullptr) {
    splits = p.workspace.ndim == 3 ? p.workspace.shape[0] : 0;
    if (p.workspace.dtype != DType::F32 || splits < 1 || p.workspace.shape[1] != M || p.workspace.shape[2] != N ||
        !p.workspace.is_contiguous() || splits > K / kBlockK)
      return make_status(StatusCode::kInvalidArgument, "[sparse24_gemm] workspace must be contiguous float32 [S, M, N], 1 <= S <= K/64");
  }
  if (!aligned16(x) || !aligned16(p.values) || !aligned16(p.meta))
    return make_status(StatusCode::kInvalidArgument, "[sparse24_gemm] x, values and meta must be 16-byte aligned");
  if (M > INT32_MAX / 2 || N > INT32_MAX / 4 || K > INT32_MAX / 2)
    return make_status(StatusCode::kUnsupported, "[sparse24_gemm] a dimension is too large");
  if (M == 0 || N == 0) return Status::Ok();
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K), s = static_cast<int>(splits);
  if (x.dtype == DType::F16) return dispatch_m<__half>(p, m, n, k, s, stream);
  return dispatch_m<__nv_bfloat16>(p, m, n, k, s, stream);
}

}  // namespace calibra
