// Tensor-core building blocks shared by calibra's inference GEMMs (w4a16_gemm.cu, sparse24_gemm.cu):
// cp.async global->shared copies, ldmatrix, mma.sync / mma.sp wrappers, and the split-K reduction.
// Everything here is sm_80 PTX, which Hopper (sm_90a) also runs.
#pragma once
#include <type_traits>

#include "common.cuh"

namespace calibra {
namespace gemm {

// ---- asynchronous copies (cp.async, sm_80) ------------------------------------------------------
// 16 bytes global -> shared without passing through registers. src_bytes < 16 zero-fills the rest
// (src_bytes = 0 reads nothing: used for rows past M, so tails need no separate code path).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(pending)); }

// ---- ldmatrix -----------------------------------------------------------------------------------
// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i of every
// lane receives (row lane/4, columns 2*(lane%4), +1) of matrix i -- the mma A/B fragment order.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// ---- element type traits --------------------------------------------------------------------------
template <class T> struct Act;
template <> struct Act<__half> {
  using T2 = __half2;
  // 0x6400 is 1024.0: OR-ing a nibble q into its low mantissa bits gives exactly 1024 + q.
  static constexpr uint32_t kMagic2 = 0x64006400u;
  static __device__ __forceinline__ float magic() { return 1024.0f; }
};
template <> struct Act<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  // 0x4300 is 128.0 in bfloat16 (7 mantissa bits, spacing 1 on [128, 256)): 0x4300 | q == 128 + q.
  static constexpr uint32_t kMagic2 = 0x43004300u;
  static __device__ __forceinline__ float magic() { return 128.0f; }
};

template <class T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) { return *reinterpret_cast<uint32_t*>(&v); }
template <class T2>
__device__ __forceinline__ T2 as_t2(uint32_t v) { return *reinterpret_cast<T2*>(&v); }

// ---- mma ------------------------------------------------------------------------------------------
// D = A(16x16, row) * B(16x8, col) + D, fp32 accumulators (PTX "mma.m16n8k16 with floating point type").
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// D = A(16x32, 2:4 sparse, given as its 16x16 kept values + metadata e) * B(32x8, col) + D. Sparsity
// selector 0: the metadata comes from lanes 4g and 4g+1 of each quad (layout in params/gemm.h).
// ::ordered_metadata: each group's two indices are in increasing order, which calibra's 2:4 layout
// guarantees (compress_24 sorts them; decompress_24 rejects any other). ptxas advises this form for
// sm_90a: plain .sp "is expected to have substantially reduced performance on some future architectures".
template <class T>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  } else {
    asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
}

// ---- shared-memory swizzle ------------------------------------------------------------------------
// A tile row of 64 halves is 128 bytes = 8 chunks of 16 bytes. Stored plainly, the 8 rows one ldmatrix
// reads would all hit the same 4 banks; XOR-ing the chunk index with (row % 8) spreads them over all 32.
__device__ __forceinline__ int swz128(int row, int chunk) { return row * 8 + (chunk ^ (row & 7)); }

// ---- split-K ----------------------------------------------------------------------------------------
// out[m, n] = sum over s of ws[s, m, n], in s order (deterministic). Host side in gemm_splitk.cu.
Status splitk_reduce(const float* ws, int64_t splits, int64_t M, int64_t N, DType dtype, void* out, cudaStream_t stream);

// Number of K tiles each split handles (the same normalization as calibra/ops/gemm.py split_k).
inline int64_t tiles_per_split(int64_t k_tiles, int64_t splits) { return (k_tiles + splits - 1) / splits; }

}  // namespace gemm
}  // namespace calibra
