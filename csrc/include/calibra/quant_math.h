// Scalar integer-quantization arithmetic shared by every kernel that produces GPTQ-convention codes
// (calibra::quantize_int, calibra::gptq_block_sweep), host and device. One copy of the math means the
// codes of a GPTQ sweep equal those of plain RTN on the same values, and both equal
// calibra.ops._ref.quantize: true divisions (no reciprocal multiply), round-half-even through the
// exact magic-number trick, no FMA contraction (the build passes -ffp-contract=off / --fmad=false).
#pragma once
#include <cstdint>

#include "calibra/dtype.h"
#if !defined(__CUDACC__)
#include "calibra/half.h"
#endif

#if defined(__CUDACC__)
#define CALIBRA_QM __host__ __device__ __forceinline__
#else
#define CALIBRA_QM inline
#endif

namespace calibra {
namespace qmath {

constexpr float kMagic = 12582912.0f;      // 1.5 * 2^23: (x + kMagic) - kMagic rounds half to even
constexpr float kClampRound = 4194304.0f;  // 2^22: the trick is exact for |x| <= 2^22

CALIBRA_QM float round_even(float x) { return (x + kMagic) - kMagic; }

// The scale before it is rounded to the scale dtype. mn = min(min x, 0), mx = max(max x, 0).
// Symmetric: 2 * amax / maxq; asymmetric: (mx - mn) / maxq.
CALIBRA_QM float int_raw_scale(float mn, float mx, float maxq, bool symmetric) {
  if (symmetric) {
    const float amax = -mn > mx ? -mn : mx;
    return (2.0f * amax) / maxq;
  }
  return (mx - mn) / maxq;
}

// The zero point from the stored (rounded, nonzero) scale s: (maxq + 1) / 2 for symmetric,
// clamp(rne(-mn / s), 0, maxq) for asymmetric.
CALIBRA_QM float int_zero(float mn, float s, float maxq, bool symmetric) {
  if (symmetric) return (maxq + 1.0f) / 2.0f;
  const float z = round_even(-mn / s);
  return z < 0.0f ? 0.0f : (z > maxq ? maxq : z);
}

// The code of x: clamp(rne(x / s) + zero, 0, maxq), as a float holding an integer.
CALIBRA_QM float int_code(float x, float s, float zero, float maxq) {
  float q = x / s;
  q = q < -kClampRound ? -kClampRound : (q > kClampRound ? kClampRound : q);
  q = round_even(q) + zero;
  return q < 0.0f ? 0.0f : (q > maxq ? maxq : q);
}

// The value a code stands for: (q - zero) * s.
CALIBRA_QM float int_dequant(float q, float s, float zero) { return (q - zero) * s; }

#if !defined(__CUDACC__)
// s rounded to the scale dtype (float32 | float16 | bfloat16), as the stored scale will hold it; a
// stored 0 (an all-zero group, or a scale too small for the dtype) becomes 1.
inline float round_scale(DType dt, float s) {
  switch (dt) {
    case DType::F16: {
      const float r = half_to_float(float_to_half(s));
      return r == 0.0f ? 1.0f : r;
    }
    case DType::BF16: {
      const float r = bf16_to_float(float_to_bf16(s));
      return r == 0.0f ? 1.0f : r;
    }
    default: return s == 0.0f ? 1.0f : s;
  }
}
#endif

}  // namespace qmath
}  // namespace calibra
