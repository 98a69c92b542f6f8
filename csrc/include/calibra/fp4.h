// Scalar FP4 / FP8 helpers shared by host and device code: E2M1 rounding (ties to the even code),
// float8_e4m3fn rounding (RNE, out of range -> NaN, as torch's cast does) and decoding, E8M0 exponent.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CALIBRA_HD __host__ __device__ __forceinline__
#else
#define CALIBRA_HD inline
#endif

namespace calibra {
namespace fp4 {

CALIBRA_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
CALIBRA_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

// E2M1 magnitudes by index: [0, .5, 1, 1.5, 2, 3, 4, 6] (exponent idx >> 1, mantissa bit idx & 1),
// built from the fp32 bits (no table, so device code keeps it in registers).
CALIBRA_HD float e2m1_magnitude(int idx) {
  const uint32_t e = static_cast<uint32_t>(idx & 7) >> 1, m = static_cast<uint32_t>(idx) & 1u;
  if (e == 0) return m ? 0.5f : 0.0f;
  return u2f(((e - 1u + 127u) << 23) | (m << 22));
}

// Nearest E2M1 code of x, ties to the even code, saturating at +-6. A value that rounds to zero
// (including -0 and small negatives) encodes as code 0 (+0), never 8 (-0). NaN encodes as 0 (callers
// reject non-finite input before this).
CALIBRA_HD uint8_t e2m1_encode(float x) {
  const float a = x < 0.0f ? -x : x;
  const int idx = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  return static_cast<uint8_t>(idx | ((x < 0.0f && idx != 0) ? 8 : 0));
}

CALIBRA_HD float e2m1_decode(uint8_t code) {
  const float m = e2m1_magnitude(code & 7);
  return (code & 8) ? -m : m;
}

// fp32 -> float8_e4m3fn bits, like torch's .to(torch.float8_e4m3fn) (checked against torch 2.13 on a
// dense sweep): round to nearest even; magnitudes that round above 448, and +-Inf, saturate to +-448
// (0x7e); NaN -> 0x7f | sign. Subnormals (steps of 2^-9) round exactly.
CALIBRA_HD uint8_t e4m3_from_float(float f) {
  const uint32_t u = f2u(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7fu;
  if (a == 0x7f800000u) return sign | 0x7eu;
  if (a < 0x3c800000u) {  // below 2^-6: an integer count of 2^-9 steps, rounded to nearest even
    // a * 2^9 is exact; adding and subtracting 2^23 rounds it to an integer (ties to even).
    const float steps = u2f(a) * 512.0f;
    const float r = (steps + 8388608.0f) - 8388608.0f;
    return sign | static_cast<uint8_t>(static_cast<uint32_t>(r));  // 8 -> 0x08 == 2^-6
  }
  // normal: keep 3 mantissa bits, round the 20 dropped bits to nearest even, rebias 127 -> 7
  const uint32_t r = (a + 0x7ffffu + ((a >> 20) & 1u)) >> 20;
  const uint32_t code = r - ((127u - 7u) << 3);
  return sign | static_cast<uint8_t>(code > 0x7eu ? 0x7eu : code);
}

CALIBRA_HD float e4m3_to_float(uint8_t b) {
  const uint32_t e = (b >> 3) & 0xfu, m = b & 7u;
  float v;
  if ((b & 0x7fu) == 0x7fu) v = u2f(0x7fc00000u);
  else if (e == 0) v = static_cast<float>(m) * 0.001953125f;  // m * 2^-9, exact
  else v = u2f(((e + 120u) << 23) | (m << 20));
  return (b & 0x80u) ? -v : v;
}

// 2^e as fp32 for e in [-127, 127] (2^-127 is subnormal), exact.
CALIBRA_HD float exp2_int(int e) {
  return e >= -126 ? u2f(static_cast<uint32_t>(e + 127) << 23) : u2f(0x00400000u);
}

// OCP MX shared exponent of a group with max |w| = amax > 0 (finite): floor(log2(amax)) - 2,
// clamped to [-127, 127]. floor(log2) read exactly from the fp32 exponent bits (subnormals too).
CALIBRA_HD int mx_exponent(float amax) {
  const uint32_t u = f2u(amax) & 0x7fffffffu;
  int fl;
  if (u >= 0x00800000u) {
    fl = static_cast<int>(u >> 23) - 127;
  } else {  // subnormal: 2^-149 * mantissa; floor(log2) = -149 + index of the top set bit
    int top = 31;
    while (top > 0 && !((u >> top) & 1u)) --top;
    fl = -149 + top;
  }
  int e = fl - 2;
  return e < -127 ? -127 : (e > 127 ? 127 : e);
}

}  // namespace fp4
}  // namespace calibra
