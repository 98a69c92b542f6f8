// calibra::gptq_block_sweep -- the inner column sweep of GPTQ (and, with a mask, of SparseGPT) over one
// block of columns. The caller (python/calibra/quant/gptq.py) does the outer lazy-batch loop and the
// GEMM W[:, end:] -= Err @ U[block, end:]; this kernel does the sequential part:
//
//   for i in 0..C-1:
//     if fit[i] > 0: fit the params of table entry group[i] from the current columns [i, i + fit[i])
//     q[:, i]   = dequant(quant(x[:, i], params[group[i]]))        (0 where mask)
//     err[:, i] = (x[:, i] - q[:, i]) / u[i, i]
//     x[:, j]  -= err[:, i] * u[i, j]                  for j > i   (mul then sub, no FMA)
//
// calibra::sparsegpt_block_sweep is the same sweep (same kernel core) for SparseGPT's N:M patterns: the
// prune mask is not an input but chosen inside the sweep and returned (SparsegptSweepParams below):
//
//     if i % m == 0: for each row, rank sal[j] = x[:, j]^2 / (u[j, j] * u[j, j]) over j in [i, i + m):
//                    rank(j) = #{k: sal[k] > sal[j]} + #{k < j: sal[k] == sal[j]}; prune[:, j] = rank(j) >= n
//     (then as above, with prune as the mask)
//
// so exactly m - n weights per group and row are pruned; among equal saliencies the lower index is kept
// (calibra::nm_mask's rule). It is a sibling op rather than (n, m) on gptq_block_sweep because the chosen
// mask is an extra output: each op keeps one signature through every layer.
//
// Reference: calibra.ops._ref.gptq (gptq_block_sweep, sparsegpt_block_sweep; same operations in the
// same order per element, so codes, masks and floats match bit for bit).
#pragma once
#include <cstdint>

#include "calibra/status.h"
#include "calibra/stream.h"
#include "calibra/tensor_arg.h"

namespace calibra {

enum class SweepFormat : int { kInt = 0, kMxfp4 = 1, kNvfp4 = 2, kNone = 3 };

struct GptqSweepParams {
  // Inputs
  TensorArg w;       // [R, C] float32: the block of W after the previous blocks' lazy updates.
  TensorArg u;       // [C, C] float32: the block of the upper Cholesky factor of H^-1 (diagonal > 0).
  TensorArg scales;  // [R, G] float32: parameter table in (static groups, per-row params, or unused).
  TensorArg zeros;   // [R, G] float32: zero points (integer-valued; 0 for fp4).
  TensorArg group;   // [C] int32: the table entry column i uses, in [0, G).
  TensorArg fit;     // [C] int32: > 0 -> fit entry group[i] at column i from columns [i, i + fit[i]).
  TensorArg mask;    // [R, C] uint8 (1 = prune to 0, for SparseGPT) or an empty tensor for none.
  TensorArg shrink;  // [K] float32: clipping candidates p (range scaled by p); K == 1 with {1} = plain.
  // Outputs (contiguous)
  TensorArg q;           // [R, C] float32: the quantized (dequantized-value) block.
  TensorArg codes;       // [R, C] uint8: int codes (GPTQ convention), E2M1 codes for fp4, 0 for "none".
  TensorArg err;         // [R, C] float32: (x - q) / u[i, i], the scaled errors for the lazy update.
  TensorArg scales_out;  // [R, G] float32: the table after the fits (int: the stored scale;
                         //   mxfp4: 2^e; nvfp4: the e4m3 scale value before dividing by global_scale).
  TensorArg zeros_out;   // [R, G] float32
  int64_t bits = 4;            // int: 2..8
  bool symmetric = true;       // int only
  SweepFormat format = SweepFormat::kInt;
  DType scale_dtype = DType::F32;  // int: scales are rounded to this dtype when fitted
  float global_scale = 1.0f;       // nvfp4: d = scale / global_scale
  // CUDA only: int64 [1] holding INT64_MAX; the kernel lowers it to the first column whose group or
  // fit entry is out of range (device data the host cannot check before the launch).
  TensorArg error_flag;
};

// "int" / "mxfp4" / "nvfp4" / "none" -> format; false for anything else.
inline bool parse_sweep_format(const char* s, SweepFormat* f) {
  auto eq = [](const char* a, const char* b) {
    while (*a && *a == *b) { ++a; ++b; }
    return *a == *b;
  };
  if (eq(s, "int")) { *f = SweepFormat::kInt; return true; }
  if (eq(s, "mxfp4")) { *f = SweepFormat::kMxfp4; return true; }
  if (eq(s, "nvfp4")) { *f = SweepFormat::kNvfp4; return true; }
  if (eq(s, "none")) { *f = SweepFormat::kNone; return true; }
  return false;
}

struct SparsegptSweepParams {
  GptqSweepParams sweep;  // the sweep's inputs and outputs; sweep.mask must be empty (the sweep chooses it)
  int64_t n = 2;          // keep n of every m columns per row: 0 < n < m <= kMaxNmM, C % m == 0
  int64_t m = 4;
  TensorArg prune;        // [R, C] bool output: 1 where the sweep pruned the weight
};

constexpr int64_t kMaxNmM = 32;  // as calibra::nm_mask

Status gptq_block_sweep_cpu(const GptqSweepParams& p);
Status gptq_block_sweep_cuda(const GptqSweepParams& p, cudaStream_t stream);
Status sparsegpt_block_sweep_cpu(const SparsegptSweepParams& p);
Status sparsegpt_block_sweep_cuda(const SparsegptSweepParams& p, cudaStream_t stream);

}  // namespace calibra
