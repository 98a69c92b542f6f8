// Argument checks of the quantize/dequantize kernels, shared by the CPU (csrc/cpu/quantize.cpp) and
// CUDA (cuda/quantize.cu) entry points, so both backends refuse the same inputs with the same message.
// Python's op checks run first on every path; these guard the native entry points themselves.
// Host code only (no device qualifiers): nvcc compiles it in the host pass.
#pragma once
#include <cstdint>

#include "calibra/params/quantize.h"
#include "calibra/status.h"

namespace calibra {
namespace quantize_checks {

inline bool is_w_dtype(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }
inline bool shaped(const TensorArg& t, int64_t a, int64_t b) { return t.ndim == 2 && t.shape[0] == a && t.shape[1] == b; }
inline bool is_global_scale(const TensorArg& t) {
  return t.ndim == 1 && t.shape[0] == 1 && t.dtype == DType::F32;
}

// Sizes of an int-quantized matrix: out rows, n columns, G groups of gs columns per row.
struct IntShape {
  int64_t out = 0, n = 0, groups = 1, gs = 0;
};

// Group layout for `n` columns; false when group_size is neither -1 nor a divisor of n.
inline bool int_groups(int64_t group_size, int64_t n, IntShape& s) {
  if (group_size != -1 && (group_size < 1 || n % group_size != 0)) return false;
  s.n = n;
  s.groups = group_size == -1 ? 1 : n / group_size;
  s.gs = group_size == -1 ? n : group_size;
  return true;
}

inline Status check_quantize_int(const QuantizeIntParams& p, IntShape& s) {
  if (p.w.ndim != 2 || !is_w_dtype(p.w.dtype))
    return make_status(StatusCode::kInvalidArgument, "[quantize] w must be a 2-D float32/float16/bfloat16 tensor");
  if (p.bits < 2 || p.bits > 8)
    return make_status(StatusCode::kInvalidArgument, "[quantize] bits must be in [2, 8], got %lld", static_cast<long long>(p.bits));
  s.out = p.w.shape[0];
  if (!int_groups(p.group_size, p.w.shape[1], s))
    return make_status(StatusCode::kInvalidArgument, "[quantize] group_size %lld does not divide in_features %lld",
                       static_cast<long long>(p.group_size), static_cast<long long>(p.w.shape[1]));
  if (!shaped(p.codes, s.out, s.n) || p.codes.dtype != DType::U8 || !p.codes.is_contiguous() ||
      !shaped(p.scales, s.out, s.groups) || p.scales.dtype != p.w.dtype || !p.scales.is_contiguous() ||
      !shaped(p.zeros, s.out, s.groups) || p.zeros.dtype != DType::U8 || !p.zeros.is_contiguous())
    return make_status(StatusCode::kInvalidArgument,
                       "[quantize] outputs must be contiguous codes uint8 [out, in], scales [out, G] in w's dtype, zeros uint8 [out, G]");
  return Status::Ok();
}

inline Status check_dequantize_int(const DequantizeIntParams& p, IntShape& s) {
  if (p.codes.ndim != 2 || p.codes.dtype != DType::U8)
    return make_status(StatusCode::kInvalidArgument, "[dequantize] codes must be a 2-D uint8 tensor");
  s.out = p.codes.shape[0];
  if (!int_groups(p.group_size, p.codes.shape[1], s))
    return make_status(StatusCode::kInvalidArgument, "[dequantize] group_size %lld does not divide in_features %lld",
                       static_cast<long long>(p.group_size), static_cast<long long>(p.codes.shape[1]));
  if (!shaped(p.scales, s.out, s.groups) || !is_w_dtype(p.scales.dtype) || !shaped(p.zeros, s.out, s.groups) ||
      p.zeros.dtype != DType::U8)
    return make_status(StatusCode::kInvalidArgument, "[dequantize] scales and zeros must be [out, G] float / uint8");
  if (!shaped(p.out, s.out, s.n) || !is_w_dtype(p.out.dtype) || !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[dequantize] out must be a contiguous float [out, in] tensor");
  return Status::Ok();
}

// Sizes of an FP4 matrix: out rows, n columns, blocks of gs (32 for mxfp4, 16 for nvfp4).
struct Fp4Shape {
  int64_t out = 0, n = 0, gs = 0;
  bool mx = true;
};

inline Status check_quantize_fp4(const QuantizeFp4Params& p, Fp4Shape& s) {
  if (p.w.ndim != 2 || !is_w_dtype(p.w.dtype))
    return make_status(StatusCode::kInvalidArgument, "[quantize] w must be a 2-D float32/float16/bfloat16 tensor");
  s.mx = p.format == Fp4Format::kMxfp4;
  if (!s.mx && p.format != Fp4Format::kNvfp4)
    return make_status(StatusCode::kInvalidArgument, "[quantize] unknown fp4 format");
  s.gs = s.mx ? 32 : 16;
  s.out = p.w.shape[0];
  s.n = p.w.shape[1];
  if (s.n % s.gs != 0)
    return make_status(StatusCode::kInvalidArgument, "[quantize] %s needs in_features divisible by %lld, got %lld",
                       s.mx ? "mxfp4" : "nvfp4", static_cast<long long>(s.gs), static_cast<long long>(s.n));
  if (!shaped(p.codes, s.out, s.n) || p.codes.dtype != DType::U8 || !p.codes.is_contiguous() ||
      !shaped(p.scales, s.out, s.n / s.gs) || p.scales.dtype != (s.mx ? DType::U8 : DType::F8E4M3) ||
      !p.scales.is_contiguous() || !is_global_scale(p.global_scale))
    return make_status(StatusCode::kInvalidArgument,
                       "[quantize] outputs must be contiguous codes uint8 [out, in], scales [out, in/%lld], global_scale float32 [1]",
                       static_cast<long long>(s.gs));
  return Status::Ok();
}

inline Status check_dequantize_fp4(const DequantizeFp4Params& p, Fp4Shape& s) {
  s.mx = p.format == Fp4Format::kMxfp4;
  if (!s.mx && p.format != Fp4Format::kNvfp4)
    return make_status(StatusCode::kInvalidArgument, "[dequantize] unknown fp4 format");
  if (p.codes.ndim != 2 || p.codes.dtype != DType::U8)
    return make_status(StatusCode::kInvalidArgument, "[dequantize] codes must be a 2-D uint8 tensor");
  s.gs = s.mx ? 32 : 16;
  s.out = p.codes.shape[0];
  s.n = p.codes.shape[1];
  if (s.n % s.gs != 0 || !shaped(p.scales, s.out, s.n / s.gs) || p.scales.dtype != (s.mx ? DType::U8 : DType::F8E4M3) ||
      !is_global_scale(p.global_scale))
    return make_status(StatusCode::kInvalidArgument, "[dequantize] scales must be [out, in/%lld] and global_scale float32 [1]",
                       static_cast<long long>(s.gs));
  if (!shaped(p.out, s.out, s.n) || !is_w_dtype(p.out.dtype) || !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[dequantize] out must be a contiguous float [out, in] tensor");
  return Status::Ok();
}

}  // namespace quantize_checks
}  // namespace calibra
