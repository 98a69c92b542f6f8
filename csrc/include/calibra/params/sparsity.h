// calibra::nm_mask, calibra::compress_24, calibra::decompress_24 -- N:M structured sparsity.
#pragma once
#include "calibra/status.h"
#include "calibra/stream.h"
#include "calibra/tensor_arg.h"

namespace calibra {

constexpr int64_t kNmMaxM = 32;

struct NmMaskParams {
  // scores: [..., K] float32 | float16 | bfloat16, any strides; K % m == 0; no NaN (kInvalidArgument
  //         "[nm_mask] scores must not contain NaN (found NaN at index [i, j, ...])", first in row-major).
  // out:    bool, contiguous, shaped like scores. In every group of m consecutive elements along the
  //         last dim, element j is kept iff rank(j) < n, with
  //         rank(j) = #{i : s_i > s_j} + #{i < j : s_i == s_j}
  //         (a stable descending order: among equal scores the lower index wins; -0.0 == +0.0).
  TensorArg scores;
  TensorArg out;
  int64_t n = 0;  // 0 < n < m
  int64_t m = 0;  // 2 <= m <= kNmMaxM
  TensorArg err;  // CUDA only: int64 [1], lowered to the row-major element index of the first NaN
};

// 2:4 compression with the per-row metadata semantics of NVIDIA sparse tensor cores (mma.sp for
// fp16/bf16): every group of 4 consecutive elements along K keeps 2, described by a pair of 2-bit
// indices; a 16-bit word describes 16 columns (4 groups), so K % 16 == 0.
//   meta[r, c/16] bits 4g..4g+3 describe group g (columns c+4g .. c+4g+3) of the chunk: first kept
//   index in bits 4g..4g+1, second in bits 4g+2..4g+3, distinct and ascending. A group with fewer
//   than 2 nonzeros (-0.0 is zero, NaN is nonzero) is filled with its lowest unused indices.
// The words are in plain row-major order: the fragment interleaving a specific mma.sp shape needs
// (which thread holds which rows' metadata) is the consuming GEMM's job and is not applied here.
struct Compress24Params {
  // w: [R, K] float32 | float16 | bfloat16, any strides, K % 16 == 0, at most 2 nonzeros per group of
  //    4 (else kInvalidArgument "[compress_24] w is not 2:4 sparse: row r, columns c..c+3 hold N nonzeros").
  // values: [R, K/2], w's dtype, contiguous: the kept elements of each group in ascending index order.
  // meta:   [R, K/16] int16, contiguous.
  TensorArg w;
  TensorArg values;
  TensorArg meta;
  TensorArg err;  // CUDA only: int64 [1], lowered to the row-major group index r*(K/4) + g of the first bad group
};

struct Decompress24Params {
  // values: [R, K/2] float32 | float16 | bfloat16, any strides; meta: [R, K/16] int16, any strides.
  // out:    [R, K] values' dtype, contiguous; kept elements placed by meta, zeros (+0.0) elsewhere.
  // A metadata group whose indices are not distinct and ascending is kInvalidArgument.
  TensorArg values;
  TensorArg meta;
  TensorArg out;
  TensorArg err;  // CUDA only: int64 [1], lowered to (r*(K/16) + j)*4 + g of the first bad group
};

Status nm_mask_cpu(const NmMaskParams& p);
Status compress_24_cpu(const Compress24Params& p);
Status decompress_24_cpu(const Decompress24Params& p);
Status nm_mask_cuda(const NmMaskParams& p, cudaStream_t stream);
Status compress_24_cuda(const Compress24Params& p, cudaStream_t stream);
Status decompress_24_cuda(const Decompress24Params& p, cudaStream_t stream);

}  // namespace calibra
