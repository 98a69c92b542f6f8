// fp16 / bf16 <-> fp32 conversions for host code, round-to-nearest-even like torch's casts.
// Written with integer bit operations so they behave the same on every compiler and CPU.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace calibra {

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));      // inf / nan
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));  // normal
  // zero or subnormal: mant * 2^-24 is exact in fp32
  const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return bits_float(sign | float_bits(mag));
}

inline uint16_t float_to_half(float f) {
  uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;  // nan (quiet)
  if (ax >= 0x477ff000u) return sign | 0x7c00u; // >= 65520 rounds to inf
  if (ax >= 0x38800000u) {                      // normal fp16 range (>= 2^-14)
    // rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even
    ax += 0xc8000fffu + ((ax >> 13) & 1u);
    return sign | static_cast<uint16_t>(ax >> 13);
  }
  // subnormal fp16: the integer count of 2^-24 steps, rounded to nearest even (1024 = 2^-14 normal)
  const float steps = bits_float(ax) * 16777216.0f;
  return sign | static_cast<uint16_t>(std::nearbyint(steps));
}

inline float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

}  // namespace calibra
