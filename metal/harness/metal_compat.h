// Metal Shading Language -> C++20, for running calibra's compute kernels on the CPU (see run_kernel.h).
//
// Covers the subset calibra's kernels use, and nothing else on purpose: a kernel that steps outside
// it fails to compile here, which is the signal to either extend this file or stay inside the subset.
//   - address-space qualifiers: `device`, `constant`, `thread` vanish; `threadgroup` becomes `static`,
//     so a threadgroup array must be declared at kernel function scope (`threadgroup float buf[N];`)
//     and nowhere else (tests/metal checks the sources for this);
//   - `kernel` vanishes; [[buffer(n)]] / [[thread_position_in_grid]] ... are unknown attributes to
//     g++ (ignored, -Wno-attributes); the harness driver passes each such parameter by hand;
//   - scalar and vector types (uint, ushort, uchar, half = _Float16, uint2/uint3/float2/float4),
//     as_type<>, the math and integer functions used, precise::divide;
//   - threadgroup_barrier(mem_flags::...) = a real std::barrier over the threadgroup's threads;
//   - simd_sum / simd_max / simd_min / simd_shuffle_xor / simd_broadcast = an exchange through
//     per-thread slots with a std::barrier over the SIMD group's 32 threads.
// Not covered: textures, atomics, simdgroup matrices, indirect dispatch, non-uniform barriers.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "run_kernel.h"

namespace metal {

using uint = unsigned int;
using ushort = unsigned short;
using uchar = unsigned char;
using ulong = unsigned long;
using half = _Float16;

template <class T, int N>
struct vec;
template <class T>
struct vec<T, 2> {
  T x{}, y{};
  vec() = default;
  vec(T a, T b) : x(a), y(b) {}
  explicit vec(T a) : x(a), y(a) {}
};
template <class T>
struct vec<T, 3> {
  T x{}, y{}, z{};
  vec() = default;
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  explicit vec(T a) : x(a), y(a), z(a) {}
};
template <class T>
struct vec<T, 4> {
  T x{}, y{}, z{}, w{};
  vec() = default;
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  explicit vec(T a) : x(a), y(a), z(a), w(a) {}
};
using uint2 = vec<uint, 2>;
using uint3 = vec<uint, 3>;
using uint4 = vec<uint, 4>;
using float2 = vec<float, 2>;
using float4 = vec<float, 4>;

inline uint3 to_uint3(const mh::Dim3& d) { return uint3(d.x, d.y, d.z); }

template <class To, class From>
inline To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type between types of different sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }
template <class T> inline T clamp(T v, T lo, T hi) { return min(max(v, lo), hi); }
inline float fmin(float a, float b) { return std::fmin(a, b); }
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float abs(float a) { return std::fabs(a); }
inline int abs(int a) { return a < 0 ? -a : a; }
inline float fabs(float a) { return std::fabs(a); }
inline float rint(float a) { return std::rint(a); }  // round half to even (default rounding mode)
inline float floor(float a) { return std::floor(a); }
inline float sqrt(float a) { return std::sqrt(a); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline bool isfinite(float a) { return std::isfinite(a); }
inline bool isnan(float a) { return std::isnan(a); }
inline uint popcount(uint v) { return static_cast<uint>(__builtin_popcount(v)); }
inline uint ctz(uint v) { return v ? static_cast<uint>(__builtin_ctz(v)) : 32u; }
inline uint clz(uint v) { return v ? static_cast<uint>(__builtin_clz(v)) : 32u; }

namespace precise {
inline float divide(float a, float b) { return a / b; }  // IEEE, correctly rounded
}  // namespace precise

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
inline mem_flags operator|(mem_flags a, mem_flags b) {
  return static_cast<mem_flags>(static_cast<int>(a) | static_cast<int>(b));
}

inline void threadgroup_barrier(mem_flags) { mh::group_barrier(); }
inline void simdgroup_barrier(mem_flags) {
  mh::simd_exchange(0, [](auto, unsigned, unsigned, int v) { return v; });
}

template <class T>
inline T simd_sum(T v) {
  return mh::simd_exchange(v, [](auto read, unsigned, unsigned width, T) {
    T s = read(0);
    for (unsigned l = 1; l < width; ++l) s += read(l);
    return s;
  });
}
template <class T>
inline T simd_max(T v) {
  return mh::simd_exchange(v, [](auto read, unsigned, unsigned width, T) {
    T s = read(0);
    for (unsigned l = 1; l < width; ++l) s = max(s, read(l));
    return s;
  });
}
template <class T>
inline T simd_min(T v) {
  return mh::simd_exchange(v, [](auto read, unsigned, unsigned width, T) {
    T s = read(0);
    for (unsigned l = 1; l < width; ++l) s = min(s, read(l));
    return s;
  });
}
template <class T>
inline T simd_shuffle_xor(T v, ushort mask) {
  return mh::simd_exchange(v, [mask](auto read, unsigned lane, unsigned width, T own) {
    const unsigned src = lane ^ mask;
    return src < width ? read(src) : own;
  });
}
template <class T>
inline T simd_broadcast(T v, ushort lane) {
  return mh::simd_exchange(v, [lane](auto read, unsigned, unsigned width, T own) {
    return lane < width ? read(lane) : own;
  });
}

}  // namespace metal

using metal::uint;
using metal::ushort;
using metal::uchar;
using metal::ulong;
using metal::half;

// Address spaces and function qualifiers. Defined last: nothing after this may use std::thread.
#define kernel
#define device
#define constant
#define thread
#define threadgroup static
