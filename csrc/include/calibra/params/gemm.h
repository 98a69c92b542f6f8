// Inference GEMMs for compressed weights and their host-side layout helpers:
//   calibra::w4a16_repack, calibra::w4a16_gemm, calibra::sparse24_reorder_meta, calibra::sparse24_gemm.
//
// Every GEMM computes y[m, n] = sum_k x[m, k] * W[n, k] (a Linear without bias: y = x W^T) with fp32
// accumulation on tensor cores. The weights are re-laid out ONCE, at load time, by the layout helpers
// (CPU kernels here, pure-torch references in python/calibra/ops/_ref/gemm.py), so the GEMM kernels read
// every weight word straight into the register the tensor-core instruction needs.
//
// ---------------------------------------------------------------------------------------------------
// W4A16 tile layout (the output of w4a16_repack)
//
// Input: qweight int32 [N, K/8], calibra.ops.pack(codes, 4) of uint8 codes [N, K] (compressed-tensors
// weight_packed, MLX words): code(n, k) sits at bits 4*(k%8) .. 4*(k%8)+3 of qweight[n, k/8].
//
// Output: tiled int32 [K/16, 2N]. Row kt holds the 16 input features 16kt .. 16kt+15 for all N outputs, in
// blocks of 64 outputs (128 words each); inside a block, word index 4*lane + j (lane 0..31, j 0..3) is the
// word that warp lane `lane` dequantizes for the 16x16 (k x n) sub-tile j (outputs 64b + 16j .. +15).
// With g = lane / 4 and t = lane % 4, nibble i = a + 4c (a = 0..3, c = 0..1) of that word holds
//     code(n = 64b + 16j + g + 8*(a >> 1),  k = 16kt + 2t + c + 8*(a & 1)).
// Why: mma.sync.m16n8k16 reads its B operand (k x n, "col") as two .b32 registers per lane holding
// (k = 2t, 2t+1; n = g) and (k = 2t+8, 2t+9; n = g) of an n8 block (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"). The kernel extracts nibble pairs (a, a+4) with one mask,
// ((word >> 4a) & 0x000F000F): the low half gets nibble a, the high half nibble a+4, which by the rule above
// are the two consecutive k of one B register: a = 0, 1 are registers 0, 1 of n8 block 2j, a = 2, 3 those
// of n8 block 2j+1. One 16-byte load per lane therefore feeds 8 mma instructions (4 sub-tiles x 2 n8 blocks).
// Requires N % 64 == 0 and K % 16 == 0 (the GEMM itself needs K % 64 == 0).
//
// Scales and zeros of the GEMM are [G, N] (transposed from calibra's [N, G], contiguous along N so a
// block's 64..256 columns are one contiguous load) in the activation dtype; zeros hold the integer zero
// point z as a float (0..15), or are absent for symmetric weights (z = 8). Dequantization is
// (code - z) * scale rounded once to the activation dtype, which is bit-identical to
// calibra.ops.dequantize_int(...) in that dtype: code - z is exact, and one multiply rounds once.
//
// ---------------------------------------------------------------------------------------------------
// 2:4 metadata register layout (the output of sparse24_reorder_meta)
//
// Input: meta int16 [N, K/16] from calibra.ops.compress_24 (row-major: word (r, c) describes columns
// 16c .. 16c+15 of row r; group q at bits 4q .. 4q+3, first kept index in the low 2 bits).
// Output: int32 [N/16, K/2]; row rt, column 16*kq + 2*g + h (kq = K/32 index, g = 0..7, h = 0..1) is
//     (meta[16rt + g, 2kq + h] & 0xFFFF) | (meta[16rt + g + 8, 2kq + h] << 16).
// Why: mma.sp.sync.m16n8k32 (f16/bf16) with sparsity selector 0 takes its 32-bit metadata from lanes
// 4g + 0 and 4g + 1 of each quad g; lane 4g + h holds, in bits 0..15, the 16-bit metadata of row g of the
// 16x32 A tile for columns 16h .. 16h+15, and in bits 16..31 that of row g + 8 (PTX ISA, "Sparse MMA
// .m16n8k32 metadata layout for .f16/.bf16"; the per-row 16-bit word is exactly compress_24's). So lane
// 4g + h of a warp loads word 2g + h of the 16-word group of its tile: one 32-bit load per mma.sp.
// Requires N % 16 == 0 and K % 32 == 0 (the GEMM itself needs K % 64 == 0).
// The values [N, K/2] of compress_24 are used as they are: the A fragment of mma.sp.m16n8k32 over the
// compressed 16x16 values is the dense m16n8k16 A fragment, which ldmatrix.x4 loads from row-major rows.
#pragma once
#include "calibra/status.h"
#include "calibra/stream.h"
#include "calibra/tensor_arg.h"

namespace calibra {

struct W4A16RepackParams {
  TensorArg qweight;  // int32 [N, K/8], any strides; N % 64 == 0, K % 16 == 0
  TensorArg out;      // int32 [K/16, 2N], contiguous (layout above)
};

struct W4A16GemmParams {
  // x:      [M, K] float16 | bfloat16, contiguous; K % 64 == 0, K % group == 0
  // tiled:  int32 [K/16, 2N] (w4a16_repack), contiguous; N % 64 == 0
  // scales: [G, N] x's dtype, contiguous, G = K / group
  // zeros:  [G, N] x's dtype, contiguous, or data == nullptr (symmetric, z = 8)
  // group:  input features per group: 16, 32 or a multiple of 64 (K itself for per-channel)
  // out:    [M, N] x's dtype, contiguous
  // workspace: CUDA split-K partial sums, float32 [S, M, N] contiguous (S = number of K splits), or
  //            data == nullptr for no split (S = 1). Allocated by Python (calibra/ops/gemm.py).
  TensorArg x;
  TensorArg tiled;
  TensorArg scales;
  TensorArg zeros;
  int64_t group = 0;
  TensorArg out;
  TensorArg workspace;
};

struct Sparse24ReorderMetaParams {
  TensorArg meta;  // int16 [N, K/16], any strides; N % 16 == 0, (K/16) % 2 == 0
  TensorArg out;   // int32 [N/16, K/2], contiguous (layout above)
};

struct Sparse24GemmParams {
  // x:      [M, K] float16 | bfloat16, contiguous; K % 64 == 0
  // values: [N, K/2] x's dtype, contiguous (compress_24's values); N % 16 == 0
  // meta:   int32 [N/16, K/2] (sparse24_reorder_meta), contiguous
  // out:    [M, N] x's dtype, contiguous; workspace as for W4A16GemmParams
  TensorArg x;
  TensorArg values;
  TensorArg meta;
  TensorArg out;
  TensorArg workspace;
};

// Output columns per CUDA thread block and the smallest M tile of each GEMM (the kernels static_assert
// them; calibra/ops/gemm.py mirrors them and tests/ops/test_gemm.py checks the mirror).
constexpr int64_t kW4A16BlockN = 256, kW4A16MinRows = 16;
constexpr int64_t kSparse24BlockN = 128, kSparse24MinRows = 8;

// How many K slices a CUDA GEMM uses (the workspace's S): 1 when the (M, N) tiles already fill the GPU
// (sms multiprocessors), otherwise enough slices for about two thread blocks per SM, each slice at least
// 4 K tiles of 64 long (so the asynchronous copy pipeline fills), at most 16; normalized so that no slice
// is empty. The one copy of the rule: Python (calibra/ops/gemm.py, through calibra._cpu) sizes the
// workspace with it, the C++ benchmark calls it directly.
inline int64_t gemm_split_k(int64_t m, int64_t n, int64_t k, int64_t sms, int64_t n_tile, int64_t m_tile_min) {
  int64_t m_tile = m_tile_min;
  while (m_tile < 64 && m_tile < m) m_tile *= 2;
  const int64_t tiles = ((m + m_tile - 1) / m_tile) * ((n + n_tile - 1) / n_tile), k_tiles = k / 64;
  if (m == 0 || tiles >= sms) return 1;
  int64_t s = (2 * sms + tiles - 1) / tiles;
  if (k_tiles / 4 < s) s = k_tiles / 4;
  if (s > 16) s = 16;
  if (s < 1) s = 1;
  const int64_t per = (k_tiles + s - 1) / s;
  return (k_tiles + per - 1) / per;
}

Status w4a16_repack_cpu(const W4A16RepackParams& p);
Status sparse24_reorder_meta_cpu(const Sparse24ReorderMetaParams& p);
// Plain CPU GEMMs (workspace unused) so the ops run natively everywhere: each output row n dequantizes /
// decompresses W[n, :] once into the activation dtype, then fp32 dot products with every x row.
Status w4a16_gemm_cpu(const W4A16GemmParams& p);
Status sparse24_gemm_cpu(const Sparse24GemmParams& p);
Status w4a16_repack_cuda(const W4A16RepackParams& p, cudaStream_t stream);
Status sparse24_reorder_meta_cuda(const Sparse24ReorderMetaParams& p, cudaStream_t stream);
Status w4a16_gemm_cuda(const W4A16GemmParams& p, cudaStream_t stream);
Status sparse24_gemm_cuda(const Sparse24GemmParams& p, cudaStream_t stream);

}  // namespace calibra
