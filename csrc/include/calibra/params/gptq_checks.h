// Argument checks of the GPTQ / SparseGPT block sweep, shared by the CPU (csrc/cpu/gptq.cpp) and CUDA
// (cuda/gptq.cu) entry points: shapes, dtypes and the N:M settings. What reads tensor contents (the
// group/fit ranges, on the CPU) or exists on one backend only (CUDA's error flag) stays in that backend.
// Host code only: nvcc compiles it in the host pass.
#pragma once
#include <cstdint>

#include "calibra/params/gptq.h"
#include "calibra/status.h"

namespace calibra {
namespace gptq_checks {

inline bool shaped(const TensorArg& t, DType dt, int64_t a, int64_t b) {
  return t.ndim == 2 && t.dtype == dt && t.shape[0] == a && t.shape[1] == b && t.is_contiguous();
}
inline bool shaped1(const TensorArg& t, DType dt, int64_t a) {
  return t.ndim == 1 && t.dtype == dt && t.shape[0] == a && t.is_contiguous();
}

// nm_m == 0: gptq_block_sweep (mask input optional); nm_m > 0: sparsegpt_block_sweep (no mask input;
// prune is its [R, C] bool output).
inline Status check_sweep(const GptqSweepParams& p, const char* op, int64_t nm_n, int64_t nm_m, const TensorArg* prune) {
  if (p.w.ndim != 2 || p.w.dtype != DType::F32 || !p.w.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "%s w must be a contiguous float32 [R, C] tensor", op);
  const int64_t R = p.w.shape[0], C = p.w.shape[1];
  if (!shaped(p.u, DType::F32, C, C))
    return make_status(StatusCode::kInvalidArgument, "%s u must be a contiguous float32 [C, C] tensor (C = %lld)", op,
                       static_cast<long long>(C));
  const int64_t G = p.scales.ndim == 2 ? p.scales.shape[1] : -1;
  if (!shaped(p.scales, DType::F32, R, G) || !shaped(p.zeros, DType::F32, R, G) || !shaped(p.scales_out, DType::F32, R, G) ||
      !shaped(p.zeros_out, DType::F32, R, G))
    return make_status(StatusCode::kInvalidArgument, "%s scales, zeros and their outputs must be contiguous float32 [R, G]", op);
  if (!shaped1(p.group, DType::I32, C) || !shaped1(p.fit, DType::I32, C))
    return make_status(StatusCode::kInvalidArgument, "%s group and fit must be contiguous int32 [C]", op);
  if (p.mask.numel() != 0 && !shaped(p.mask, DType::U8, R, C))
    return make_status(StatusCode::kInvalidArgument, "%s mask must be a contiguous uint8 [R, C] tensor or empty", op);
  if (prune != nullptr) {
    if (p.mask.numel() != 0)
      return make_status(StatusCode::kInvalidArgument, "%s takes no mask input: the sweep chooses the N:M mask", op);
    if (!(0 < nm_n && nm_n < nm_m && nm_m <= kMaxNmM))
      return make_status(StatusCode::kInvalidArgument, "%s need 0 < n < m <= %lld, got n=%lld m=%lld", op,
                         static_cast<long long>(kMaxNmM), static_cast<long long>(nm_n), static_cast<long long>(nm_m));
    if (C % nm_m != 0)
      return make_status(StatusCode::kInvalidArgument,
                         "%s the block's column count (%lld) must be a multiple of m = %lld: an N:M group must not "
                         "straddle two blocks", op, static_cast<long long>(C), static_cast<long long>(nm_m));
    if (!shaped(*prune, DType::Bool, R, C))
      return make_status(StatusCode::kInvalidArgument, "%s output prune must be a contiguous bool [R, C] tensor", op);
  }
  if (p.shrink.ndim != 1 || p.shrink.dtype != DType::F32 || p.shrink.shape[0] < 1 || !p.shrink.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "%s shrink must be a non-empty contiguous float32 [K]", op);
  if (!shaped(p.q, DType::F32, R, C) || !shaped(p.err, DType::F32, R, C) || !shaped(p.codes, DType::U8, R, C))
    return make_status(StatusCode::kInvalidArgument, "%s outputs q, err (float32) and codes (uint8) must be contiguous [R, C]", op);
  if (p.format == SweepFormat::kInt && (p.bits < 2 || p.bits > 8))
    return make_status(StatusCode::kInvalidArgument, "%s bits must be in [2, 8], got %lld", op, static_cast<long long>(p.bits));
  if (p.scale_dtype != DType::F32 && p.scale_dtype != DType::F16 && p.scale_dtype != DType::BF16)
    return make_status(StatusCode::kInvalidArgument, "%s scale_dtype must be float32, float16 or bfloat16", op);
  return Status::Ok();
}

}  // namespace gptq_checks
}  // namespace calibra
