// The load-time re-layouts of the inference GEMMs (w4a16_repack, sparse24_reorder_meta), shared by the CPU
// (csrc/cpu/gemm.cpp) and CUDA (cuda/gemm_layout.cu) kernels: the argument checks (host) and the index
// maps of params/gemm.h written per output word (host and device), so both backends produce the same
// words by construction.
#pragma once
#include <cstdint>

#include "calibra/fp4.h"  // CALIBRA_HD
#include "calibra/params/gemm.h"
#include "calibra/status.h"

namespace calibra {
namespace gemm_layout {

inline Status check_w4a16_repack(const W4A16RepackParams& p, int64_t& N, int64_t& K) {
  const TensorArg& q = p.qweight;
  if (q.ndim != 2 || q.dtype != DType::I32)
    return make_status(StatusCode::kInvalidArgument, "[w4a16_repack] qweight must be a 2-D int32 tensor");
  N = q.shape[0];
  K = q.shape[1] * 8;
  if (N % 64 != 0 || K % 16 != 0)
    return make_status(StatusCode::kInvalidArgument, "[w4a16_repack] need out_features %% 64 == 0 and in_features %% 16 == 0");
  if (p.out.dtype != DType::I32 || p.out.ndim != 2 || p.out.shape[0] != K / 16 || p.out.shape[1] != 2 * N ||
      !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[w4a16_repack] out must be contiguous int32 [K/16, 2N]");
  return Status::Ok();
}

inline Status check_sparse24_reorder_meta(const Sparse24ReorderMetaParams& p, int64_t& N, int64_t& KW) {
  const TensorArg& m = p.meta;
  if (m.ndim != 2 || m.dtype != DType::I16)
    return make_status(StatusCode::kInvalidArgument, "[sparse24_reorder_meta] meta must be a 2-D int16 tensor");
  N = m.shape[0];
  KW = m.shape[1];
  if (N % 16 != 0 || KW % 2 != 0)
    return make_status(StatusCode::kInvalidArgument, "[sparse24_reorder_meta] need rows %% 16 == 0 and columns %% 32 == 0");
  if (p.out.dtype != DType::I32 || p.out.ndim != 2 || p.out.shape[0] != N / 16 || p.out.shape[1] != 8 * KW ||
      !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[sparse24_reorder_meta] out must be contiguous int32 [N/16, K/2]");
  return Status::Ok();
}

// Word w of k-tile kt of the repacked W4A16 weight (out[kt, w], w < 2N): the eight 4-bit codes lane
// (w % 128) / 4 of warp tile w / 128 needs for n-fragment w % 4, in mma B-fragment order.
// q: GPTQ-style int32 [N, K/8] (8 codes per word, lowest nibble first), element strides qs0, qs1.
CALIBRA_HD uint32_t w4a16_repacked_word(const uint32_t* q, int64_t qs0, int64_t qs1, int64_t kt, int64_t w) {
  const int64_t b = w / 128, lane = (w % 128) / 4, j = w % 4;
  const int64_t g = lane / 4, t = lane % 4;
  uint32_t word = 0;
  for (int i = 0; i < 8; ++i) {
    const int a = i % 4, c = i / 4;
    const int64_t n = 64 * b + 16 * j + g + 8 * (a >> 1);
    const int64_t k = 16 * kt + 2 * t + c + 8 * (a & 1);
    word |= ((q[n * qs0 + (k / 8) * qs1] >> (4 * (k % 8))) & 0xFu) << (4 * i);
  }
  return word;
}

// Word col of row tile rt of the reordered 2:4 metadata (out[rt, col], col < 8 KW): the int16 words of
// rows g and g + 8 of the tile (g = (col % 16) / 2), columns 2 (col / 16) + col % 2, low and high half.
// m: compress_24's int16 meta [N, KW], element strides ms0, ms1.
CALIBRA_HD uint32_t sparse24_reordered_word(const uint16_t* m, int64_t ms0, int64_t ms1, int64_t rt, int64_t col) {
  const int64_t kq = col / 16, g = (col % 16) / 2, h = col % 2;
  const uint32_t lo = m[(16 * rt + g) * ms0 + (2 * kq + h) * ms1];
  const uint32_t hi = m[(16 * rt + g + 8) * ms0 + (2 * kq + h) * ms1];
  return lo | (hi << 16);
}

}  // namespace gemm_layout
}  // namespace calibra
