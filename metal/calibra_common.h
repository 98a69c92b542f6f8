// Helpers shared by calibra's Metal kernels: typed loads/stores of float tensors whose dtype is a
// run-time argument (fp32, fp16, bf16 -- one kernel per op instead of one per dtype; the branch is
// uniform over the grid), bf16 rounding like torch, and the FP4/FP8 scalar codecs of
// csrc/include/calibra/fp4.h written in Metal.
//
// Exactness: calibra's integer outputs must equal the reference bit for bit, so the arithmetic here
// uses IEEE division (precise::divide), rint (half to even) and no multiply-add that a compiler could
// contract into an fma (the metallib is built with -fno-fast-math).
#pragma once
#include "kargs.h"

inline float cal_bf16_to_float(ushort b) { return as_type<float>(uint(b) << 16); }

// torch's float -> bfloat16: round to nearest even; every NaN becomes 0x7fc0.
inline ushort cal_float_to_bf16(float f) {
  const uint u = as_type<uint>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return ushort(0x7fc0);
  return ushort((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float cal_load(device const uchar* p, ulong i, long dt) {
  if (dt == kF32) return ((device const float*)p)[i];
  if (dt == kF16) return float(((device const half*)p)[i]);
  return cal_bf16_to_float(((device const ushort*)p)[i]);
}

inline void cal_store(device uchar* p, ulong i, long dt, float v) {
  if (dt == kF32) ((device float*)p)[i] = v;
  else if (dt == kF16) ((device half*)p)[i] = half(v);
  else ((device ushort*)p)[i] = cal_float_to_bf16(v);
}

// v rounded to dtype dt and back (a scale as it will be stored).
inline float cal_round_to(float v, long dt) {
  if (dt == kF32) return v;
  if (dt == kF16) return float(half(v));
  return cal_bf16_to_float(cal_float_to_bf16(v));
}

inline float cal_div(float a, float b) { return precise::divide(a, b); }

// ---- FP4 / FP8 (same definitions as calibra/fp4.h) ----

inline float cal_e2m1_magnitude(uint idx) {
  const uint e = (idx & 7u) >> 1, m = idx & 1u;
  if (e == 0u) return m ? 0.5f : 0.0f;
  return as_type<float>(((e - 1u + 127u) << 23) | (m << 22));
}

inline uchar cal_e2m1_encode(float x) {
  const float a = x < 0.0f ? -x : x;
  const uint idx = uint(a > 0.25f) + uint(a >= 0.75f) + uint(a > 1.25f) + uint(a >= 1.75f) + uint(a > 2.5f) +
                   uint(a >= 3.5f) + uint(a > 5.0f);
  return uchar(idx | ((x < 0.0f && idx != 0u) ? 8u : 0u));
}

inline float cal_e2m1_decode(uchar code) {
  const float m = cal_e2m1_magnitude(uint(code) & 7u);
  return (code & 8) ? -m : m;
}

inline uchar cal_e4m3_from_float(float f) {
  const uint u = as_type<uint>(f);
  const uchar sign = uchar((u >> 24) & 0x80u);
  const uint a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uchar(sign | 0x7fu);
  if (a == 0x7f800000u) return uchar(sign | 0x7eu);
  if (a < 0x3c800000u) {
    const float steps = as_type<float>(a) * 512.0f;
    const float r = (steps + 8388608.0f) - 8388608.0f;
    return uchar(sign | uchar(uint(r)));
  }
  const uint r = (a + 0x7ffffu + ((a >> 20) & 1u)) >> 20;
  const uint code = r - ((127u - 7u) << 3);
  return uchar(sign | uchar(code > 0x7eu ? 0x7eu : code));
}

inline float cal_e4m3_to_float(uchar b) {
  const uint e = (uint(b) >> 3) & 0xfu, m = uint(b) & 7u;
  float v;
  if ((b & 0x7f) == 0x7f) v = as_type<float>(0x7fc00000u);
  else if (e == 0u) v = float(m) * 0.001953125f;
  else v = as_type<float>(((e + 120u) << 23) | (m << 20));
  return (b & 0x80) ? -v : v;
}

inline float cal_exp2_int(int e) {
  return e >= -126 ? as_type<float>(uint(e + 127) << 23) : as_type<float>(0x00400000u);
}

inline int cal_mx_exponent(float amax) {
  const uint u = as_type<uint>(amax) & 0x7fffffffu;
  const int fl = u >= 0x00800000u ? int(u >> 23) - 127 : -149 + int(31u - clz(u));
  const int e = fl - 2;
  return e < -127 ? -127 : (e > 127 ? 127 : e);
}
